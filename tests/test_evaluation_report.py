"""Evaluation report: Table-1 numbers, Dice box plot, self-contained HTML (rendered in
headless Chromium when available)."""

from __future__ import annotations

import base64
import csv
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from voxreg.core.errors import VoxregError
from voxreg.evaluation import report as er
from voxreg.io.labels import label_name
from voxreg.viz import evaluation as viz_evaluation

RESULTS_COLUMNS = [
    "id",
    "fixed",
    "moving",
    "method",
    "status",
    "error",
    "dice_mean",
    "dice_std",
    "hd95_mean_mm",
    "folding_percent",
    "sdlogj",
    "ncc_before",
    "ncc_after",
    "mi_before",
    "mi_after",
    "tre_before_mm",
    "tre_after_mm",
    "seconds",
    "peak_memory_mb",
    "device",
    "threads",
    "settings",
]
GPU = "NVIDIA H100 80GB HBM3"
# (id, method, status, dice, hd95, folding %, sdlogj, ncc before/after, seconds, memory, device)
FAKE = [
    ("p1", "voxelmorph", "ok", 0.80, 3.0, 0.10, 0.30, (0.50, 0.80), 10.0, 500, "cpu"),
    ("p1", "instance-opt", "ok", 0.85, 2.5, 0.00, 0.20, ("", ""), 2.0, 1200, GPU),
    ("p1", "ants", "ok", 0.78, "", "", "", ("", ""), 60.0, 300, "cpu"),
    ("p2", "voxelmorph", "ok", 0.70, 4.0, 0.30, 0.50, (0.40, 0.70), 20.0, 700, "cpu"),
    ("p2", "instance-opt", "ok", 0.75, 3.5, 0.02, 0.40, ("", ""), 30.0, 900, "cpu"),
    ("p2", "ants", "failed", "", "", "", "", ("", ""), "", "", "cpu"),
]
STRUCTURES = (17, 53, 10, 49, 16, 24)  # hippocampus L/R, thalamus L/R, brain stem, CSF


def _png(seed: int) -> bytes:
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3, 2))
    FigureCanvasAgg(fig)
    fig.add_subplot().imshow(np.random.default_rng(seed).random((16, 24)), cmap="gray")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=60)
    return buffer.getvalue()


def make_fake_outdir(outdir: Path) -> Path:
    """An OUTDIR as `voxreg evaluate` writes it: 3 methods x 2 pairs, 6 structures,
    one failed row, one CUDA row, two example PNGs."""
    outdir.mkdir(parents=True, exist_ok=True)
    with open(outdir / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, RESULTS_COLUMNS)
        writer.writeheader()
        for pid, method, status, dice, hd, fold, sdj, (ncc0, ncc1), sec, mem, device in FAKE:
            writer.writerow(
                {
                    "id": pid,
                    "fixed": f"/data/{pid}/fixed.nii.gz",
                    "moving": f"/data/{pid}/moving.nii.gz",
                    "method": method,
                    "status": status,
                    "error": "antsRegistration exited with code 1 | <bad> & worse" if status != "ok" else "",
                    "dice_mean": dice,
                    "dice_std": 0.05 if dice != "" else "",
                    "hd95_mean_mm": hd,
                    "folding_percent": fold,
                    "sdlogj": sdj,
                    "ncc_before": ncc0,
                    "ncc_after": ncc1,
                    "seconds": sec,
                    "peak_memory_mb": mem,
                    "device": device,
                    "threads": 2,
                    "settings": '{"lambda": 1.0}',
                }
            )
    with open(outdir / "per_structure.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "method", "label", "name", "dice", "hd95_mm"])
        rng = np.random.default_rng(0)
        for pid, method, status, dice, *_ in FAKE:
            if status != "ok":
                continue
            for k, code in enumerate(STRUCTURES):
                name = "" if (pid, k) == ("p2", 5) else label_name(code)  # one row without a name
                writer.writerow(
                    [
                        pid,
                        method,
                        code,
                        name,
                        f"{np.clip(dice + rng.normal(0, 0.08), 0, 1):.4f}",
                        f"{rng.uniform(1, 6):.2f}",
                    ]
                )
    (outdir / "examples").mkdir(exist_ok=True)
    (outdir / "examples" / "p1_voxelmorph.png").write_bytes(_png(1))
    (outdir / "examples" / "p2_instance-opt.png").write_bytes(_png(2))
    return outdir


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    outdir = make_fake_outdir(tmp_path_factory.mktemp("evaluation"))
    return outdir, er.write_report(outdir)


def _markdown_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| Method"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows[cells[0]] = cells[1:]
    return rows


def test_returns_written_paths(report):
    outdir, paths = report
    assert set(paths) == {"table", "boxplot", "html", "csv"}
    assert all(p.parent == outdir and p.is_file() for p in paths.values())
    assert not [p for p in outdir.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_table1_numbers(report):
    _, paths = report
    text = paths["table"].read_text(encoding="utf-8")
    first, second = text.split("## Similarity")
    rows = _markdown_rows(first)
    assert list(rows) == ["voxelmorph", "instance-opt", "ants"]  # order of first appearance
    # Dice (0.80, 0.70): mean 0.750, std 0.050; HD95 (3, 4); folding (0.1, 0.3); SD log J (0.3, 0.5)
    assert rows["voxelmorph"] == [
        "0.750 (0.050)",
        "3.50 (0.50)",
        "0.200 (0.100)",
        "0.400 (0.100)",
        "–",
        "15.00 ± 5.00",
        "700",
        "2/0",
    ]
    # one CUDA pair (2 s) and one CPU pair (30 s); peak memory = max(1200, 900)
    assert rows["instance-opt"] == [
        "0.800 (0.050)",
        "3.00 (0.50)",
        "0.010 (0.010)",
        "0.300 (0.100)",
        "2.00 ± 0.00",
        "30.00 ± 0.00",
        "1200",
        "2/0",
    ]
    # failed pair excluded from the statistics, counted in ok/failed
    assert rows["ants"] == ["0.780 (0.000)", "–", "–", "–", "–", "60.00 ± 0.00", "300", "1/1"]
    assert "cpu (2 threads)" in first and GPU in first
    sim = _markdown_rows(second)
    assert sim["voxelmorph"] == ["0.450 → 0.750"]  # NCC only: MI and TRE have no values
    assert sim["ants"] == ["– → –"]
    assert "MI" not in second and "TRE" not in second


def test_summary_csv(report):
    _, paths = report
    with open(paths["csv"], newline="") as handle:
        rows = {r["method"]: r for r in csv.DictReader(handle)}
    assert float(rows["voxelmorph"]["dice_mean"]) == pytest.approx(0.75)
    assert float(rows["voxelmorph"]["dice_std"]) == pytest.approx(0.05)
    assert rows["instance-opt"]["gpu_seconds_mean"] == "2"
    assert rows["ants"]["pairs_failed"] == "1" and rows["ants"]["hd95_mean_mm"] == ""


def test_boxplot_png(report):
    from matplotlib.image import imread

    _, paths = report
    data = paths["boxplot"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 15_000
    image = imread(paths["boxplot"])
    assert image.shape[0] > 300 and image.shape[1] > 600


def test_structure_grouping_pools_hemispheres(report):
    outdir, _ = report
    with open(outdir / "per_structure.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    structures, values = er.structure_dice(rows)
    assert structures == ["Thalamus", "Brain-Stem", "Hippocampus", "CSF"]  # by smallest code
    assert len(values["Hippocampus"]["voxelmorph"]) == 4  # 2 pairs x left/right
    assert len(values["CSF"]["ants"]) == 1  # its failed pair has no rows; nameless row named by code


def test_html_is_self_contained(report):
    outdir, paths = report
    text = paths["html"].read_text(encoding="utf-8")
    table1 = re.search(r'<table id="table1">(.*?)</table>', text, re.S).group(1)
    assert table1.count("<tr>") == 4 and "0.750 (0.050)" in table1 and "2.00 ± 0.00" in table1
    assert '<img id="dice-boxplot" src="data:image/png;base64,' in text
    images = re.findall(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == 3 and text.count('class="example"') == 2
    assert base64.b64decode(images[0]) == paths["boxplot"].read_bytes()
    assert "antsRegistration exited with code 1 | &lt;bad&gt; &amp; worse" in text  # escaped error
    assert 'id="pairs"' in text and 'class="failed"' in text
    for external in ("http://", "https://", "<script", "<link", "url("):
        assert external not in text
    assert "torch" in text and "CPUs" in text


def test_missing_inputs(tmp_path):
    with pytest.raises(VoxregError, match="results.csv: file not found"):
        er.write_report(tmp_path)
    (tmp_path / "results.csv").write_text("id,method\np1,vxm\n")
    with pytest.raises(VoxregError, match="missing column.*status"):
        er.write_report(tmp_path)
    (tmp_path / "results.csv").write_text("id,method,status\n")
    with pytest.raises(VoxregError, match="no result rows"):
        er.write_report(tmp_path)


def test_minimal_results_without_per_structure(tmp_path):
    (tmp_path / "results.csv").write_text(
        "id,method,status,dice_mean,seconds,device\na,vxm,ok,0.5,1.5,cuda:0\nb,vxm,failed,,,\n"
    )
    paths = er.write_report(tmp_path)
    rows = _markdown_rows(paths["table"].read_text(encoding="utf-8"))
    assert rows["vxm"] == ["0.500 (0.000)", "–", "–", "–", "1.50 ± 0.00", "–", "–", "1/1"]
    assert paths["boxplot"].stat().st_size > 1000
    assert "Similarity" not in paths["table"].read_text(encoding="utf-8")


def test_many_structures_split_into_rows():
    rows = [
        {"id": f"p{p}", "method": m, "label": str(code), "name": label_name(code), "dice": "0.7"}
        for p in range(2)
        for m in ("a", "b")
        for code in [*range(1002, 1036), 10, 49, 17, 53]
    ]
    structures, _ = er.structure_dice(rows)
    assert len(structures) == 36  # 34 cortical names (1004 corpuscallosum included) + 2
    chunks = viz_evaluation.chunks(structures, 24)
    assert [len(c) for c in chunks] == [18, 18]
    assert er.dice_boxplot_png(rows, ["a", "b"])[:4] == b"\x89PNG"


# --------------------------------------------------------------------------- headless Chromium

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMEDRIVER = "/usr/bin/chromedriver"


def _chrome_driver(width: int = 1400, height: int = 3000):
    """A headless Chrome WebDriver using the system chromedriver (never Selenium Manager)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install 'voxreg[test]')")
    browser = next((b for b in CHROMIUM if Path(b).exists()), None) or shutil.which("chromium")
    if not browser or not Path(CHROMEDRIVER).exists():
        missing = [n for n, ok in (("chromium", browser), ("chromedriver", Path(CHROMEDRIVER).exists())) if not ok]
        pytest.skip(f"{' and '.join(missing)} not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
        "--hide-scrollbars",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def render_screenshot(html_path: Path, png_path: Path, width: int = 1400, height: int = 3000) -> dict:
    """Open ``html_path`` in headless Chromium, save a screenshot, return what the page shows."""
    driver = _chrome_driver(width, height)
    try:
        driver.set_page_load_timeout(15)
        driver.get(html_path.resolve().as_uri())
        state = driver.execute_script("""
            const t = document.querySelector('#table1');
            const imgs = Array.from(document.images);
            return {rows: t ? t.rows.length : 0, text: t ? t.innerText : '',
                    images: imgs.map(i => [i.id || i.className, i.complete, i.naturalWidth]),
                    height: document.body.scrollHeight};""")
        driver.save_screenshot(str(png_path))
        return state
    finally:
        driver.quit()


def test_html_renders_in_headless_chromium(report, tmp_path):
    _, paths = report
    start = time.monotonic()
    state = render_screenshot(paths["html"], tmp_path / "report.png")
    assert state["rows"] > 1
    for method in ("voxelmorph", "instance-opt", "ants"):
        assert method in state["text"]
    assert len(state["images"]) == 3
    assert all(complete and width > 0 for _, complete, width in state["images"]), state["images"]
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert time.monotonic() - start < 20


def test_before_row_from_dice_before():
    from voxreg.evaluation.report import BEFORE, summarize, table1_rows

    rows = [
        {"id": "p1", "method": "a", "status": "ok", "dice_mean": "0.8", "dice_before": "0.2"},
        {"id": "p1", "method": "b", "status": "ok", "dice_mean": "0.9", "dice_before": "0.2"},
        {"id": "p2", "method": "a", "status": "ok", "dice_mean": "0.7", "dice_before": "0.4"},
    ]
    summaries = summarize(rows)
    assert [s.method for s in summaries] == [BEFORE, "a", "b"]
    assert table1_rows(summaries)[0][:2] == [BEFORE, "0.300 (0.100)"]
