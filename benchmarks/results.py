"""Results of a suite as one small JSON file, ``benchmarks/results/<suite>.json``, with the
machine it ran on (CPU count, platform, Python / torch / voxreg versions, GPU, date, git
revision). The committed files are what ``python -m benchmarks docs`` turns into tables."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _version(package: str) -> str | None:
    """Installed version of ``package`` (None when absent), without importing it."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_revision(repo: Path = REPO) -> str | None:
    """Short commit of ``repo`` with ``+dirty`` when tracked files changed (read-only git)."""
    try:
        rev = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if rev.returncode != 0:
        return None
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def gpu_name() -> str | None:
    """The first GPU ``nvidia-smi -L`` lists, or None (no torch import needed)."""
    try:
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.strip().splitlines() if done.returncode == 0 else []
    return lines[0] if lines else None


def machine_info() -> dict[str, Any]:
    """Where and when a suite ran: CPU count, platform, versions, GPU, date, git revision."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_revision": git_revision(),
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "voxreg": _version("voxreg"),
        "antspyx": _version("antspyx"),
        "gpu": gpu_name(),
    }


def result_path(suite: str, directory: Path = RESULTS_DIR) -> Path:
    """``<directory>/<suite>.json``."""
    return Path(directory) / f"{suite}.json"


def save(suite: str, payload: dict[str, Any], path: Path | None = None, command: str | None = None) -> Path:
    """Write ``{"suite", "command", "machine", **payload}`` as indented JSON; returns the path."""
    path = Path(path) if path else result_path(suite)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"suite": suite, "command": command, "machine": machine_info(), **payload}
    path.write_text(json.dumps(document, indent=1, default=str) + "\n", encoding="utf-8")
    return path


def load(suite: str, directory: Path = RESULTS_DIR) -> dict[str, Any] | None:
    """The stored results of ``suite`` (None when there are none)."""
    path = result_path(suite, directory)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def machine_line(document: dict[str, Any]) -> str:
    """One sentence naming the run: command, date, revision, CPUs, versions, GPU."""
    m = document.get("machine", {})
    parts = [f"{m.get('cpu_count')} CPU cores ({m.get('cpu')})", m.get("gpu") or "no GPU"]
    parts += [f"{name} {m[name]}" for name in ("python", "torch", "voxreg", "antspyx") if m.get(name)]
    command = document.get("command") or f"python -m benchmarks {document.get('suite')}"
    return (
        f"Generated from `benchmarks/results/{document.get('suite')}.json` (`{command}`, "
        f"{str(m.get('date', '?'))[:10]}, revision {m.get('git_revision')}): " + ", ".join(parts) + "."
    )
