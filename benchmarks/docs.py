"""Regenerate the tables of docs/benchmarks.md from ``benchmarks/results/<suite>.json``.

Each generated table sits between two marker comments::

    <!-- generated:speed -->
    ...                      (rewritten by ``python -m benchmarks docs``)
    <!-- /generated:speed -->

Only the text between a suite's markers changes; the prose around them is hand-written. A
suite without results (no JSON) or without markers in the file is left as it is.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import results

DOCS = results.REPO / "docs" / "benchmarks.md"


def markers(suite: str) -> tuple[str, str]:
    """The opening and closing marker comments of ``suite``'s generated block."""
    return f"<!-- generated:{suite} -->", f"<!-- /generated:{suite} -->"


def generated_suites(text: str) -> list[str]:
    """The suites with an opening marker in ``text``, in order of appearance."""
    return re.findall(r"<!-- generated:([\w-]+) -->", text)


def replace_block(text: str, suite: str, body: str) -> str:
    """``text`` with the lines between ``suite``'s markers replaced by ``body`` (the markers
    stay). Raises KeyError when a marker is missing or they are out of order."""
    begin, end = markers(suite)
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise KeyError(f"markers of {suite!r} not found in order ({begin} ... {end})")
    head = text[: start + len(begin)]
    return head + "\n" + body.strip("\n") + "\n" + text[stop:]


def block(text: str, suite: str) -> str:
    """The text between ``suite``'s markers (without them)."""
    begin, end = markers(suite)
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise KeyError(f"markers of {suite!r} not found in order")
    return text[start + len(begin) : stop].strip("\n")


def render_document(document: dict[str, Any], render: Callable[[dict[str, Any]], str]) -> str:
    """The block of one suite: the run's machine line, then the suite's own tables."""
    return results.machine_line(document) + "\n\n" + render(document).strip("\n") + "\n"


def regenerate(
    docs: Path = DOCS,
    results_dir: Path = results.RESULTS_DIR,
    suites: list[str] | None = None,
) -> list[str]:
    """Rewrite the generated blocks of ``docs`` whose suite has results in ``results_dir``
    (or only ``suites``); returns the suites rewritten. The file is written only if changed."""
    from benchmarks import load_suite

    text = docs.read_text(encoding="utf-8")
    updated = []
    for suite in generated_suites(text):
        if suites and suite not in suites:
            continue
        document = results.load(suite, results_dir)
        if document is None:
            continue
        text = replace_block(text, suite, render_document(document, load_suite(suite).render))
        updated.append(suite)
    if text != docs.read_text(encoding="utf-8"):
        docs.write_text(text, encoding="utf-8")
    return updated
