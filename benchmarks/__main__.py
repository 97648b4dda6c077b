"""``python -m benchmarks --list | docs | <suite> [options]`` (see benchmarks/__init__.py)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

from benchmarks import SUITES, docs, list_suites, load_suite, pairs, results


def suite_parser(name: str) -> argparse.ArgumentParser:
    """The options of suite ``name``: the common ones, then the suite's own."""
    module = load_suite(name)
    parser = argparse.ArgumentParser(
        prog=f"python -m benchmarks {name}",
        description=module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="smallest run that exercises the suite (checks it runs)")
    parser.add_argument(
        "--out", type=Path, help="results JSON (default benchmarks/results/<suite>.json; /tmp if --quick)"
    )
    parser.add_argument("--data", type=Path, default=None, help=f"shared data folder (default {pairs.DEFAULT_DATA})")
    parser.add_argument("--docs", action="store_true", help="then regenerate this suite's table in docs/benchmarks.md")
    module.add_arguments(parser)
    return parser


def default_out(name: str, quick: bool) -> Path:
    """Where a run's JSON goes: the committed results folder, or /tmp for ``--quick``."""
    if quick:
        return Path(tempfile.gettempdir()) / "voxreg_bench" / f"{name}.json"
    return results.result_path(name)


def run_suite(name: str, argv: list[str]) -> int:
    """Parse ``argv`` for suite ``name``, run it, save its JSON (and the docs if asked)."""
    args = suite_parser(name).parse_args(argv)
    args.data = pairs.data_root(args.data)
    module = load_suite(name)
    payload = module.run(args)
    if payload is None:  # the suite had nothing to measure (e.g. no data): said why already
        return 0
    out = args.out or default_out(name, args.quick)
    command = " ".join(["python -m benchmarks", name, *map(shlex.quote, argv)])
    path = results.save(name, payload, out, command)
    print(f"[benchmarks] {name}: results in {path}")
    print(docs.render_document(json.loads(path.read_text(encoding="utf-8")), module.render))
    if args.docs:
        if path.parent != results.RESULTS_DIR:
            print("[benchmarks] --docs reads benchmarks/results/: not updated from a --quick/--out run")
        else:
            print(f"[benchmarks] docs updated: {docs.regenerate(suites=[name]) or 'no markers for ' + name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__import__("benchmarks").__doc__)
        print("suites: " + ", ".join(SUITES) + ", docs")
        return 0
    if argv[0] == "--list":
        for name, summary in list_suites().items():
            print(f"{name:16s} {summary}")
        print(f"{'docs':16s} regenerate the tables of docs/benchmarks.md from benchmarks/results/*.json")
        return 0
    if argv[0] == "docs":
        parser = argparse.ArgumentParser(prog="python -m benchmarks docs")
        parser.add_argument("suites", nargs="*", help="only these suites (default: every suite with results)")
        parser.add_argument("--file", type=Path, default=docs.DOCS)
        parser.add_argument("--results", type=Path, default=results.RESULTS_DIR)
        args = parser.parse_args(argv[1:])
        updated = docs.regenerate(args.file, args.results, args.suites or None)
        print(f"[benchmarks] {args.file}: regenerated {', '.join(updated) or 'nothing (no results or markers)'}")
        return 0
    if argv[0] not in SUITES:
        print(f"unknown suite {argv[0]!r}; run python -m benchmarks --list", file=sys.stderr)
        return 2
    return run_suite(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
