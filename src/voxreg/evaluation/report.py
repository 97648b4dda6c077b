"""Report of a ``voxreg evaluate`` run: a Table-1-style summary, a per-structure Dice box plot
and one self-contained HTML page.

Inputs (written by ``voxreg evaluate`` into OUTDIR; empty cells mean missing):

- ``results.csv``: one row per (pair, method): id, fixed, moving, method, status (``ok`` or
  ``failed``), error, dice_mean, dice_std, hd95_mean_mm, folding_percent, sdlogj, ncc_before,
  ncc_after, mi_before, mi_after, tre_before_mm, tre_after_mm, seconds, peak_memory_mb, device
  (``cpu`` or a CUDA device name), threads, settings (JSON).
- ``per_structure.csv``: id, method, label, name, dice, hd95_mm.
- optional ``examples/<id>_<method>.png`` slice figures.

Outputs (each written to a temporary name, then renamed): ``table.md``, ``summary.csv``,
``dice_boxplot.png`` and ``report.html`` (images embedded as base64, inline CSS, no scripts).

Statistics (VoxelMorph, Balakrishnan et al. 2019, Table 1): per method, over the pairs whose
status is ``ok``: mean and standard deviation (numpy ``std``, ddof=0) of the per-pair mean
Dice, HD95, % of voxels with Jacobian <= 0 and SD of log-Jacobian; runtime mean ± std split by
device (CUDA rows -> GPU column, ``cpu`` rows -> CPU column); peak memory is the maximum over
pairs. Methods keep the order in which they first appear in ``results.csv``. The box plot pools
left and right structures (:func:`voxreg.labels.hemisphere_pair_name`): one sample per pair and
hemisphere label.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
import os
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from voxreg.core.errors import VoxregError
from voxreg.io import atomic_write
from voxreg.io import labels as _labels
from voxreg.io.tables import read_table, write_table
from voxreg.viz.evaluation import dice_boxplot

RESULTS_CSV = "results.csv"
PER_STRUCTURE_CSV = "per_structure.csv"
DASH = "–"
MAX_EXAMPLES = 6
_RESULTS_REQUIRED = ("id", "method", "status")
_PER_STRUCTURE_REQUIRED = ("id", "method", "dice")
_SIMILARITY = (
    ("ncc", "NCC", "ncc_before", "ncc_after", 3),
    ("mi", "MI", "mi_before", "mi_after", 3),
    ("tre", "TRE mm", "tre_before_mm", "tre_after_mm", 2),
)

Row = dict[str, str]


# --------------------------------------------------------------------------- reading


def _read_csv(path: Path, required: tuple[str, ...]) -> list[Row]:
    """Rows of ``path`` as dicts (missing cells -> ""); checks the required columns of the
    rows it has."""
    if not path.is_file():
        raise VoxregError(f"{path}: file not found (run 'voxreg evaluate' first)")
    rows = [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in read_table(path)]
    missing = [name for name in required if rows and name not in rows[0]]
    if missing:
        raise VoxregError(f"{path}: missing column(s) {', '.join(missing)}")
    return rows


def _num(row: Row, key: str) -> float:
    """Float value of ``row[key]``; NaN when absent, empty or not a number."""
    try:
        return float(row.get(key, "") or "nan")
    except ValueError:
        return math.nan


def _is_ok(row: Row) -> bool:
    return row.get("status", "").lower() == "ok"


def _on_gpu(row: Row) -> bool:
    device = row.get("device", "").strip().lower()
    return bool(device) and device != "cpu"


def _methods(rows: list[Row]) -> list[str]:
    """Method names in order of first appearance."""
    return list(dict.fromkeys(row["method"] for row in rows))


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Stat:
    """Mean, standard deviation (ddof=0) and count of the finite values of a column."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        """Statistics of ``values`` ignoring NaN; NaN mean/std when none is finite."""
        finite = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
        if finite.size == 0:
            return cls(math.nan, math.nan, 0)
        return cls(float(finite.mean()), float(finite.std()), int(finite.size))


@dataclass(frozen=True)
class MethodSummary:
    """Table-1 numbers of one method (over its ``ok`` pairs)."""

    method: str
    dice: Stat
    hd95: Stat
    folding: Stat
    sdlogj: Stat
    gpu_seconds: Stat
    cpu_seconds: Stat
    peak_memory_mb: float
    n_ok: int
    n_failed: int
    similarity: dict[str, tuple[Stat, Stat]]


BEFORE = "before registration"


def summarize(rows: list[Row]) -> list[MethodSummary]:
    """One :class:`MethodSummary` per method, in order of first appearance, after a
    "before registration" row (Dice of the unregistered pair) when ``dice_before`` exists."""
    before = _before_summary(rows)
    return ([before] if before is not None else []) + [
        _summarize_method(method, [r for r in rows if r["method"] == method]) for method in _methods(rows)
    ]


def _before_summary(rows: list[Row]) -> MethodSummary | None:
    """Dice of each pair before registration (``dice_before``, first ok row of each pair)."""
    per_pair: dict[str, float] = {}
    for row in rows:
        value = _num(row, "dice_before") if "dice_before" in row else math.nan
        if _is_ok(row) and math.isfinite(value):
            per_pair.setdefault(row["id"], value)
    if not per_pair:
        return None
    none = Stat(math.nan, math.nan, 0)
    return MethodSummary(
        BEFORE,
        Stat.of(list(per_pair.values())),
        none,
        none,
        none,
        none,
        none,
        math.nan,
        len(per_pair),
        0,
        {key: (none, none) for key, *_ in _SIMILARITY},
    )


def _summarize_method(method: str, rows: list[Row]) -> MethodSummary:
    ok = [r for r in rows if _is_ok(r)]

    def stat(key: str, subset: list[Row] = ok) -> Stat:
        return Stat.of([_num(r, key) for r in subset])

    memory = [v for v in (_num(r, "peak_memory_mb") for r in ok) if math.isfinite(v)]
    similarity = {key: (stat(before), stat(after)) for key, _, before, after, _ in _SIMILARITY}
    return MethodSummary(
        method=method,
        dice=stat("dice_mean"),
        hd95=stat("hd95_mean_mm"),
        folding=stat("folding_percent"),
        sdlogj=stat("sdlogj"),
        gpu_seconds=stat("seconds", [r for r in ok if _on_gpu(r)]),
        cpu_seconds=stat("seconds", [r for r in ok if not _on_gpu(r)]),
        peak_memory_mb=max(memory) if memory else math.nan,
        n_ok=len(ok),
        n_failed=len(rows) - len(ok),
        similarity=similarity,
    )


# --------------------------------------------------------------------------- formatting


def _fmt(value: float, digits: int) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else DASH


def _mean_std(stat: Stat, digits: int, sep: str = " ({})") -> str:
    """``mean (std)`` (or ``mean ± std`` with ``sep=" ± {}"``); a dash when missing."""
    if stat.n == 0:
        return DASH
    return _fmt(stat.mean, digits) + sep.format(_fmt(stat.std, digits))


TABLE1_HEADER = (
    "Method",
    "Dice mean (std)",
    "HD95 mm",
    "% |J|≤0 (folding)",
    "SD log J",
    "GPU s",
    "CPU s",
    "peak memory MB",
    "pairs ok/failed",
)


def table1_rows(summaries: list[MethodSummary]) -> list[list[str]]:
    """Formatted cells of the Table-1 summary, one list per method (see TABLE1_HEADER)."""
    return [
        [
            s.method,
            _mean_std(s.dice, 3),
            _mean_std(s.hd95, 2),
            _mean_std(s.folding, 3),
            _mean_std(s.sdlogj, 3),
            _mean_std(s.gpu_seconds, 2, " ± {}"),
            _mean_std(s.cpu_seconds, 2, " ± {}"),
            _fmt(s.peak_memory_mb, 0),
            f"{s.n_ok}/{s.n_failed}",
        ]
        for s in summaries
    ]


def similarity_columns(summaries: list[MethodSummary]) -> list[tuple[str, str, int]]:
    """(key, title, digits) of the similarity/TRE measures that have a value for some method."""
    return [
        (key, title, digits)
        for key, title, _, _, digits in _SIMILARITY
        if any(s.similarity[key][0].n or s.similarity[key][1].n for s in summaries)
    ]


def similarity_rows(summaries: list[MethodSummary]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the similarity table (``before → after`` means); empty when no
    similarity/TRE column has values."""
    columns = similarity_columns(summaries)
    if not columns:
        return [], []
    header = ["Method"] + [f"{title} before → after" for _, title, _ in columns]
    rows = []
    for s in summaries:
        if s.method == BEFORE:
            continue
        cells = [s.method]
        for key, _, digits in columns:
            before, after = s.similarity[key]
            cells.append(f"{_fmt(before.mean, digits)} → {_fmt(after.mean, digits)}")
        rows.append(cells)
    return header, rows


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown_table(header: list[str] | tuple[str, ...], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _devices(rows: list[Row]) -> list[str]:
    """Distinct devices of the ok rows, e.g. ``["cpu (2 threads)", "NVIDIA H100"]``."""
    seen = {}
    for r in rows:
        if not _is_ok(r) or not r.get("device"):
            continue
        name = r["device"]
        if not _on_gpu(r) and r.get("threads"):
            name = f"{name} ({r['threads']} threads)"
        seen[name] = None
    return list(seen)


def _footnote(rows: list[Row]) -> str:
    devices = ", ".join(_devices(rows)) or "unknown"
    return (
        "Mean (standard deviation) over the pairs that succeeded; seconds as mean ± std, "
        "split by device (GPU s: CUDA runs only). Peak memory: what the method allocated (heap in use on Linux, "
        "CUDA allocations on a GPU), maximum over pairs. "
        f"Devices: {devices}."
    )


def markdown_report(rows: list[Row], summaries: list[MethodSummary]) -> str:
    """Text of ``table.md``: the Table-1 summary and, when available, the similarity table."""
    text = "# Registration results\n\n" + _markdown_table(TABLE1_HEADER, table1_rows(summaries))
    text += "\n" + _footnote(rows) + "\n"
    header, sim_rows = similarity_rows(summaries)
    if header:
        text += "\n## Similarity and landmark error (mean before → after)\n\n"
        text += _markdown_table(header, sim_rows)
    return text


# --------------------------------------------------------------------------- box plot


def structure_dice(per_structure: list[Row]) -> tuple[list[str], dict[str, dict[str, list[float]]]]:
    """Per combined structure (left/right pooled) and method, the finite Dice values.
    Structures are ordered by their smallest label code (first appearance if not numeric)."""
    first_code: dict[str, float] = {}
    values: dict[str, dict[str, list[float]]] = {}
    for index, row in enumerate(per_structure):
        dice = _num(row, "dice")
        if not math.isfinite(dice):
            continue
        code = _num(row, "label")
        name = row.get("name") or (
            _labels.label_name(int(code)) if math.isfinite(code) else f"label {row.get('label', '?')}"
        )
        structure = _labels.hemisphere_pair_name(name)
        order = code if math.isfinite(code) else 1e9 + index
        first_code[structure] = min(first_code.get(structure, math.inf), order)
        values.setdefault(structure, {}).setdefault(row["method"], []).append(dice)
    structures = sorted(first_code, key=lambda s: (first_code[s], s))
    return structures, values


def dice_boxplot_png(per_structure: list[Row], methods: list[str], dpi: int = 110) -> bytes:
    """PNG bytes of the per-structure Dice box plot (one coloured box per method)."""
    structures, values = structure_dice(per_structure)
    return dice_boxplot(structures, values, methods, dpi=dpi)


# --------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1300px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.meta { color: #555; font-size: 0.92em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f0f3f7; } td:first-child, th:first-child { text-align: left; }
td.text, th.text { text-align: left; } td.text { word-break: break-all; max-width: 22em; }
tr.failed td { background: #fdeaea; }
.note { color: #555; font-size: 0.88em; max-width: 60em; }
img { max-width: 100%; height: auto; }
.examples { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; max-width: 620px; } figcaption { font-size: 0.88em; color: #444; }
pre.error { white-space: pre-wrap; background: #fff5f5; border: 1px solid #e8b4b4; padding: 0.5em; }
"""

_TEXT_KEYS = ("id", "method", "status", "fixed", "moving", "device", "threads")
_PAIR_COLUMNS = (
    ("id", "id", None),
    ("method", "method", None),
    ("status", "status", None),
    ("fixed", "fixed", None),
    ("moving", "moving", None),
    ("dice_mean", "Dice", 3),
    ("hd95_mean_mm", "HD95 mm", 2),
    ("folding_percent", "% |J|≤0", 3),
    ("sdlogj", "SD log J", 3),
    ("seconds", "seconds", 2),
    ("peak_memory_mb", "memory MB", 0),
    ("device", "device", None),
    ("threads", "threads", None),
)


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _html_table(header, rows: list[list[str]], table_id: str = "") -> str:
    ident = f' id="{_e(table_id)}"' if table_id else ""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>\n" for row in rows)
    return f"<table{ident}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>\n"


def _short_path(path: str) -> str:
    """The last two components of ``path`` (``subject/scan.nii.gz``); a dash when empty."""
    return "/".join(Path(path).parts[-2:]) if path else DASH


def _pair_table(rows: list[Row]) -> str:
    head = "".join(
        f'<th class="text">{_e(title)}</th>' if key in _TEXT_KEYS else f"<th>{_e(title)}</th>"
        for key, title, _ in _PAIR_COLUMNS
    )
    body = []
    for row in rows:
        cells = []
        for key, _, digits in _PAIR_COLUMNS:
            raw = row.get(key, "")
            if key in ("fixed", "moving"):
                cells.append(f'<td class="text" title="{_e(raw)}">{_e(_short_path(raw))}</td>')
            elif digits is None:
                cells.append(f'<td class="text">{_e(raw or DASH)}</td>')
            else:
                cells.append(f"<td>{_e(_fmt(_num(row, key), digits))}</td>")
        css = "" if _is_ok(row) else ' class="failed"'
        body.append(f"<tr{css}>{''.join(cells)}</tr>")
    return f'<table id="pairs">\n<thead><tr>{head}</tr></thead>\n<tbody>\n' + "\n".join(body) + "\n</tbody>\n</table>\n"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_description() -> str:
    """One line: platform, CPU count, torch and voxreg versions of this machine."""
    return (
        f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"torch {_version('torch')}, voxreg {_version('voxreg')}"
    )


def example_images(outdir: Path, rows: list[Row], limit: int = MAX_EXAMPLES) -> list[Path]:
    """Up to ``limit`` PNGs from ``outdir/examples``, in the order of ``results.csv`` rows."""
    folder = outdir / "examples"
    if not folder.is_dir():
        return []
    found = sorted(p for p in folder.glob("*.png") if p.is_file())
    rank = {f"{r['id']}_{r['method']}": i for i, r in enumerate(rows)}
    found.sort(key=lambda p: (rank.get(p.stem, len(rank)), p.name))
    return found[:limit]


def _examples_html(images: list[Path]) -> str:
    if not images:
        return '<p class="note">No example images (examples/*.png).</p>\n'
    figures = []
    for path in images:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        figures.append(
            f'<figure><img class="example" src="{_data_uri(data)}" alt="{_e(path.stem)}">'
            f"<figcaption>{_e(path.stem)}</figcaption></figure>"
        )
    return '<div class="examples">\n' + "\n".join(figures) + "\n</div>\n"


def _failed_html(rows: list[Row]) -> str:
    failed = [r for r in rows if not _is_ok(r)]
    if not failed:
        return "<p>None.</p>\n"
    items = [
        f"<li><b>{_e(r.get('id', ''))} / {_e(r['method'])}</b> "
        f"({_e(r.get('fixed', ''))} ← {_e(r.get('moving', ''))})"
        f'<pre class="error">{_e(r.get("error") or "no error message")}</pre></li>'
        for r in failed
    ]
    return '<ul id="failed">\n' + "\n".join(items) + "\n</ul>\n"


def html_report(
    outdir: Path,
    rows: list[Row],
    summaries: list[MethodSummary],
    boxplot_png: bytes,
    title: str = "voxreg evaluation report",
) -> str:
    """Text of the self-contained ``report.html``."""
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    header, sim_rows = similarity_rows(summaries)
    similarity = (
        _html_table(header, sim_rows, "similarity")
        if header
        else '<p class="note">No similarity or landmark columns in results.csv.</p>\n'
    )
    parts = [
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n',
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n",
        f"<h1>{_e(title)}</h1>\n",
        f'<p class="meta">Generated {_e(now)} from <code>{_e(outdir.resolve())}</code><br>',
        f"Machine: {_e(machine_description())}</p>\n",
        "<h2>Summary</h2>\n",
        _html_table(TABLE1_HEADER, table1_rows(summaries), "table1"),
        f'<p class="note">{_e(_footnote(rows))}</p>\n',
        "<h2>Similarity and landmark error (mean before → after)</h2>\n",
        similarity,
        "<h2>Dice per structure</h2>\n",
        f'<img id="dice-boxplot" src="{_data_uri(boxplot_png)}" alt="Dice per structure box plot">\n',
        "<h2>Examples</h2>\n",
        _examples_html(example_images(outdir, rows)),
        "<h2>Failed registrations</h2>\n",
        _failed_html(rows),
        "<h2>Per-pair results</h2>\n",
        _pair_table(rows),
        "</body>\n</html>\n",
    ]
    return "".join(parts)


# --------------------------------------------------------------------------- writing


SUMMARY_COLUMNS = (
    "method",
    "pairs_ok",
    "pairs_failed",
    "dice_mean",
    "dice_std",
    "hd95_mean_mm",
    "hd95_std_mm",
    "folding_percent_mean",
    "folding_percent_std",
    "sdlogj_mean",
    "sdlogj_std",
    "gpu_seconds_mean",
    "gpu_seconds_std",
    "cpu_seconds_mean",
    "cpu_seconds_std",
    "peak_memory_mb_max",
)


def _summary_rows(summaries: list[MethodSummary]) -> list[dict[str, object]]:
    """Machine-readable Table-1 numbers (one row per method, floats as 6 significant digits)."""
    rows = []
    for s in summaries:
        values = [
            s.dice.mean,
            s.dice.std,
            s.hd95.mean,
            s.hd95.std,
            s.folding.mean,
            s.folding.std,
            s.sdlogj.mean,
            s.sdlogj.std,
            s.gpu_seconds.mean,
            s.gpu_seconds.std,
            s.cpu_seconds.mean,
            s.cpu_seconds.std,
            s.peak_memory_mb,
        ]
        cells = [s.method, s.n_ok, s.n_failed] + [f"{v:.6g}" if math.isfinite(v) else "" for v in values]
        rows.append(dict(zip(SUMMARY_COLUMNS, cells)))
    return rows


def _write_bytes(path: Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_report(outdir: str | os.PathLike) -> dict[str, Path]:
    """Read ``OUTDIR/results.csv`` (and ``per_structure.csv`` if present) and write
    ``table.md``, ``summary.csv``, ``dice_boxplot.png`` and ``report.html`` into OUTDIR.
    Returns their paths under the keys ``table``, ``csv``, ``boxplot`` and ``html``."""
    outdir = Path(outdir)
    rows = _read_csv(outdir / RESULTS_CSV, _RESULTS_REQUIRED)
    if not rows:
        raise VoxregError(f"{outdir / RESULTS_CSV}: no result rows")
    structure_path = outdir / PER_STRUCTURE_CSV
    per_structure = _read_csv(structure_path, _PER_STRUCTURE_REQUIRED) if structure_path.exists() else []
    summaries = summarize(rows)
    boxplot = dice_boxplot_png(per_structure, _methods(rows))
    paths = {
        "table": outdir / "table.md",
        "csv": outdir / "summary.csv",
        "boxplot": outdir / "dice_boxplot.png",
        "html": outdir / "report.html",
    }
    _write_bytes(paths["table"], markdown_report(rows, summaries).encode("utf-8"))
    write_table(paths["csv"], SUMMARY_COLUMNS, _summary_rows(summaries))
    _write_bytes(paths["boxplot"], boxplot)
    _write_bytes(paths["html"], html_report(outdir, rows, summaries, boxplot).encode("utf-8"))
    return paths
