"""Measurements in fresh processes: wall seconds and peak memory, cold and warm.

- :func:`run_measured` runs a command (e.g. ``voxreg register ...``) as a child process and
  returns its wall seconds and peak resident memory, read from that child's own
  ``rusage`` (``os.wait4``), so the figure belongs to that process alone.
- :func:`measure_call` runs a Python function ``module:function`` in a fresh interpreter,
  calls it ``repeats`` times and returns the first (cold: imports and first-call costs) and
  the best later (warm) call, the process's peak RSS (``resource.getrusage``) and, when asked,
  the Python-heap peak of the calls (``tracemalloc``; torch's allocations are not in it).

Nothing else is paused: timings on a shared machine move with its load.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULT_TAG = "BENCH-RESULT "
TAIL = 20000


def child_env(src: str | Path | None = None, threads: int | None = None, **extra: str) -> dict[str, str]:
    """Environment of a measured child: ``src`` (a voxreg source tree) and this repository
    first on PYTHONPATH, thread counts for torch/OpenMP/ITK when ``threads`` is given."""
    env = dict(os.environ, **extra)
    paths = [str(Path(src).resolve())] if src else []
    paths += [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if threads:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
            env[name] = str(threads)
    return env


def _tail(path: Path) -> str:
    """The last characters of a captured output file."""
    text = path.read_text(encoding="utf-8", errors="replace")
    return text[-TAIL:]


# A small launcher between this process and the measured one: on Linux a process's peak RSS
# counts the memory of the process it was forked from until exec, so the measured command is
# forked from this ~10 MB interpreter (``python -S``), never from a suite that imported torch.
LAUNCHER = r"""
import json, os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(sys.argv[1], "w") as handle:
    json.dump({"returncode": os.waitstatus_to_exitcode(status), "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024.0,
               "user_s": usage.ru_utime, "system_s": usage.ru_stime}, handle)
"""


def run_measured(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Run ``argv`` in a fresh process; its wall seconds, peak RSS (MB, from its own rusage,
    which includes its waited-for children), exit code, user/system CPU seconds and the tails
    of stdout/stderr. A command still running after ``timeout`` seconds is killed with its
    process group (``timed_out`` true)."""
    with tempfile.TemporaryDirectory(prefix="voxreg-bench-") as tmp:
        out_path, err_path, usage_path = Path(tmp) / "stdout", Path(tmp) / "stderr", Path(tmp) / "usage.json"
        launcher = [sys.executable, "-S", "-c", LAUNCHER, str(usage_path), *map(str, argv)]
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                launcher, stdout=out, stderr=err, env=dict(env or os.environ), cwd=cwd, start_new_session=True
            )
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        usage = json.loads(usage_path.read_text()) if usage_path.is_file() else {}
        return {
            "argv": [str(a) for a in argv],
            "returncode": usage.get("returncode", proc.returncode),
            "timed_out": timed_out,
            "wall_s": usage.get("wall_s", float("nan")),
            "peak_rss_mb": usage.get("peak_rss_mb", float("nan")),
            "user_s": usage.get("user_s", float("nan")),
            "system_s": usage.get("system_s", float("nan")),
            "stdout_tail": _tail(out_path),
            "stderr_tail": _tail(err_path),
        }


CHILD = r"""
import importlib, json, resource, sys, time, tracemalloc
spec = json.loads(sys.argv[1])
module_name, _, name = spec["target"].partition(":")
start = time.perf_counter()
function = getattr(importlib.import_module(module_name), name)
import_s = time.perf_counter() - start
if spec["tracemalloc"]:
    tracemalloc.start()
calls, value = [], None
for _ in range(spec["repeats"]):
    start = time.perf_counter()
    value = function(**spec["kwargs"])
    calls.append(time.perf_counter() - start)
heap = tracemalloc.get_traced_memory()[1] / 2**20 if spec["tracemalloc"] else None
out = {"import_s": import_s, "calls_s": calls, "cold_s": calls[0], "warm_s": min(calls[1:]) if len(calls) > 1 else None,
       "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "heap_peak_mb": heap, "value": value}
print(__TAG__ + json.dumps(out, default=str), flush=True)
""".replace("__TAG__", repr(RESULT_TAG))


def measure_call(
    target: str,
    kwargs: Mapping[str, Any] | None = None,
    repeats: int = 2,
    use_tracemalloc: bool = False,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Call ``target`` (``"package.module:function"``, JSON-able keyword arguments) ``repeats``
    times in a fresh interpreter. Returns ``import_s``, ``calls_s``, ``cold_s`` (first call),
    ``warm_s`` (best later call, None for one call), ``peak_rss_mb`` (the child's peak RSS),
    ``heap_peak_mb`` (tracemalloc, when asked), ``value`` (the last call's JSON-able return
    value) and the outer ``wall_s``. Raises RuntimeError when the child fails."""
    spec = {"target": target, "kwargs": dict(kwargs or {}), "repeats": max(1, repeats), "tracemalloc": use_tracemalloc}
    run = run_measured([sys.executable, "-c", CHILD, json.dumps(spec)], env=env or child_env(), timeout=timeout)
    for line in run["stdout_tail"].splitlines()[::-1]:
        if line.startswith(RESULT_TAG):
            return {**json.loads(line[len(RESULT_TAG) :]), "wall_s": run["wall_s"]}
    reason = (run["stderr_tail"] or run["stdout_tail"]).strip().splitlines()[-1:] or ["no output"]
    raise RuntimeError(f"{target} failed (exit {run['returncode']}): {reason[0]}")


def stage_seconds(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Every number under a key ending in ``seconds`` in a ``metrics.json`` dict (nested
    keys joined by dots), e.g. ``affine.seconds``, ``registration_seconds``, ``pipeline_seconds``."""
    found: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            found.update(stage_seconds(value, name + "."))
        elif key.endswith("seconds") and isinstance(value, int | float) and not isinstance(value, bool):
            found[name] = float(value)
    return found


def noop(value: int = 0) -> int:
    """A trivial call for checking :func:`measure_call`."""
    return value
