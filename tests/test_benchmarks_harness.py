"""The benchmark harness (benchmarks/): suite registry, docs generator, timing helper, pairs.
Fast: no registration is run and no real timing is taken."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import SUITES, docs, list_suites, load_suite, pairs, results, timing  # noqa: E402
from benchmarks.__main__ import main  # noqa: E402

EXPECTED = {"speed", "evaluation", "batch", "large-scan", "affine"}


def test_registry_lists_the_suites(capsys):
    assert EXPECTED <= set(SUITES)
    summaries = list_suites()
    assert all(isinstance(text, str) and text for text in summaries.values())
    for name in SUITES:
        module = load_suite(name)
        assert callable(module.add_arguments) and callable(module.run) and callable(module.render)
    assert main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in [*SUITES, "docs"])
    with pytest.raises(KeyError):
        load_suite("no-such-suite")


def test_replace_block_changes_only_the_marked_text():
    text = "# t\nprose above\n<!-- generated:speed -->\nold table\n<!-- /generated:speed -->\nprose below\n"
    new = docs.replace_block(text, "speed", "| a |\n|---|\n| 1 |\n")
    assert new.startswith("# t\nprose above\n<!-- generated:speed -->\n| a |")
    assert new.endswith("| 1 |\n<!-- /generated:speed -->\nprose below\n")
    assert docs.block(new, "speed") == "| a |\n|---|\n| 1 |"
    assert docs.replace_block(new, "speed", "old table") == text
    with pytest.raises(KeyError):
        docs.replace_block(text, "batch", "x")


def _speed_document() -> dict:
    row = {"case": "default", "wall_s": 9.5, "peak_rss_mb": 2048.0, "returncode": 0, "engine": "network+instance"}
    row["stages_s"] = {"affine.seconds": 0.4, "registration_seconds": 7.0, "pipeline_seconds": 7.9}
    return {"pair": "2->1", "rows": [row]}


def test_docs_round_trip_on_a_temporary_copy(tmp_path):
    source = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    copy = tmp_path / "benchmarks.md"
    copy.write_text(source, encoding="utf-8")
    assert "speed" in docs.generated_suites(source)
    results.save("speed", _speed_document(), tmp_path / "results" / "speed.json", command="python -m benchmarks speed")
    assert docs.regenerate(copy, tmp_path / "results") == ["speed"]
    text = copy.read_text(encoding="utf-8")
    begin, end = docs.markers("speed")
    # everything outside the speed block is byte-for-byte the same
    assert text.split(begin)[0] == source.split(begin)[0]
    assert text.split(end)[1] == source.split(end)[1]
    assert "| default | network+instance | 9.5 | 2.00 |" in docs.block(text, "speed")
    # a second run changes nothing; suites without results keep their text
    assert docs.regenerate(copy, tmp_path / "results") == ["speed"]
    assert copy.read_text(encoding="utf-8") == text


def test_committed_results_render():
    for name in SUITES:
        document = results.load(name)
        if document is not None:
            assert docs.render_document(document, load_suite(name).render).strip()


def test_machine_info_keys():
    info = results.machine_info()
    assert {"date", "git_revision", "cpu_count", "python", "torch"} <= set(info)
    assert info["cpu_count"] >= 1


def test_run_measured_trivial_subprocess():
    run = timing.run_measured([sys.executable, "-c", "print('hi')"])
    assert {"wall_s", "peak_rss_mb", "returncode", "user_s", "system_s", "stdout_tail", "stderr_tail"} <= set(run)
    assert run["returncode"] == 0 and run["stdout_tail"].strip() == "hi" and not run["timed_out"]
    assert 0 < run["wall_s"] < 60 and 0 < run["peak_rss_mb"] < 500


def test_run_measured_timeout_and_exit_code():
    assert timing.run_measured([sys.executable, "-c", "raise SystemExit(3)"])["returncode"] == 3
    slow = timing.run_measured([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    assert slow["timed_out"]


def test_measure_call_cold_and_warm():
    measured = timing.measure_call("benchmarks.timing:noop", {"value": 7}, repeats=3, use_tracemalloc=True)
    assert {"cold_s", "warm_s", "calls_s", "peak_rss_mb", "heap_peak_mb", "import_s", "wall_s"} <= set(measured)
    assert measured["value"] == 7 and len(measured["calls_s"]) == 3
    with pytest.raises(RuntimeError):
        timing.measure_call("benchmarks.timing:no_such_function")


def test_stage_seconds_flattens_metrics():
    metrics = {"affine": {"seconds": 0.4, "init": "moments"}, "registration_seconds": 7.0, "dice": 0.6, "ok": True}
    assert timing.stage_seconds(metrics) == {"affine.seconds": 0.4, "registration_seconds": 7.0}


def test_pairs_csv(tmp_path):
    pair = pairs.Pair("a", tmp_path / "f.nii.gz", tmp_path / "m.nii.gz")
    text = pairs.write_pairs_csv(tmp_path / "p.csv", [pair]).read_text()
    assert text.splitlines()[0] == "id,fixed,moving"
    wide = pairs.write_pairs_csv(tmp_path / "q.csv", [pair], all_columns=True).read_text()
    assert wide.splitlines()[0].endswith("fixed_landmarks,moving_landmarks")


@pytest.mark.skipif(not pairs.data_root().is_dir(), reason="../shared/data not present")
def test_pairs_finds_the_mindboggle_pairs():
    found = pairs.mindboggle_pairs()
    assert [p.id for p in found] == ["2->1", "4->3", "6->5", "8->7", "10->9", "12->11", "14->13", "16->15"]
    assert all(p.exists() for p in found)
    assert pairs.parse_pairs(["2:1"])[0] == found[0]
    assert all(p.fixed.exists() for p in pairs.two_d_pairs())
    assert all(path.exists() for path in pairs.ct_scan())


def test_refine_schedule_parses_register_refinements_and_lambda():
    from benchmarks.suites.refine_schedule import align_config

    from voxreg.registration.instance import AlignConfig

    r20 = align_config("r20/l0.5")
    assert (r20.scales, r20.iterations, r20.lam) == ((2, 1), (16, 4), 0.5)
    assert r20 == AlignConfig(lam=0.5).refinement(20)  # what `register --refine 20` runs
    levels = align_config("2:20,1:5/i3/v")
    assert (levels.scales, levels.iterations, levels.int_steps, levels.residual_levels) == ((2, 1), (20, 5), 3, 0)
    assert align_config("instance").iterations == AlignConfig().iterations
    fine = align_config("2:20/l0.5/f1/s0.25")  # the velocity on each level's own grid, step 0.25
    assert (fine.scales, fine.iterations, fine.field_scale, fine.lr, fine.lam) == ((2,), (20,), 1, 0.25, 0.5)
    with pytest.raises(ValueError, match="unknown schedule suffix /x"):
        align_config("r20/x")


def test_refine_schedule_chains_a_start_from_the_affine_alignment_and_its_refinement():
    from benchmarks.suites.refine_schedule import schedule_stages

    stages, alone = schedule_stages("4:60,2:30>1:4/s0.25")
    assert alone and [(s.scales, s.iterations) for s in stages] == [((4, 2), (60, 30)), ((1,), (4,))]
    assert stages[1].lr == 0.25 and stages[0].lr == 0.35
    stages, alone = schedule_stages("4:60,2:30>")  # the start alone
    assert alone and len(stages) == 1
    stages, alone = schedule_stages("r20")  # after the network
    assert not alone and stages[0].iterations == (16, 4)
    assert schedule_stages("instance")[1]
