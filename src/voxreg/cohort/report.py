"""The cohort report of ``voxreg register-batch``: ``OUTDIR/report.html`` and QC columns in batch.csv.

:func:`write_report` reads ``OUTDIR/batch.csv`` and every pair folder, flags the pairs that
probably failed (:mod:`voxreg.cohort.qc`), adds ``qc_flag`` (1/0, empty for a pending pair)
and ``qc_reasons`` to batch.csv and writes one self-contained HTML page (no scripts, no
external files: thumbnails are base64 PNGs) with one row per pair: thumbnail (edges of the
fixed scan over the warped moving scan, :mod:`voxreg.viz.thumbnail`), Dice, NCC before/after,
% folding, SD log J, engine, seconds and the QC reasons. Thumbnails are cached in
``OUTDIR/.voxreg-qc/`` and redrawn only when a pair's ``warped.nii.gz`` is newer, so a resumed
batch does not reread every scan. Both files are written atomically.
"""

from __future__ import annotations

import base64
import html
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from voxreg.cohort import qc
from voxreg.core.errors import VoxregError, short_reason

__all__ = ["CohortReport", "render_html", "thumbnail", "write_report"]

QC_COLUMNS = ("qc_flag", "qc_reasons")
THUMBNAIL_CACHE = ".voxreg-qc"


@dataclass
class CohortReport:
    """What :func:`write_report` wrote: the page, the table, and the reasons per pair id."""

    html: Path
    table: Path
    reasons: dict[str, list[str]]

    @property
    def flagged(self) -> list[str]:
        """Ids of the flagged pairs, in table order."""
        return [pair_id for pair_id, reasons in self.reasons.items() if reasons]

    def line(self) -> str:
        """One-line summary for the terminal."""
        flagged = self.flagged
        names = f": {', '.join(flagged[:5])}{' ...' if len(flagged) > 5 else ''}" if flagged else ""
        return f"QC: {len(flagged)} of {len(self.reasons)} pairs flagged{names}; report {self.html}"


# --------------------------------------------------------------------------- thumbnails


def thumbnail(folder: Path, fixed_path: str | Path, load: Callable[[str], Any], size: int = 120) -> bytes | None:
    """PNG thumbnail of one pair folder (edges of the fixed scan over ``warped.nii.gz``),
    cached beside the folder in ``.voxreg-qc/<id>.png``; None when it cannot be drawn
    (no warped image, fixed scan gone). ``load(path)`` returns an ``Image`` (cached by the caller)."""
    from voxreg.viz.thumbnail import edge_overlay_png

    warped_path = folder / "warped.nii.gz"
    cache = folder.parent / THUMBNAIL_CACHE / f"{folder.name}.png"
    if not warped_path.is_file() or not str(fixed_path):
        return None
    if cache.is_file() and cache.stat().st_mtime_ns >= warped_path.stat().st_mtime_ns:
        return cache.read_bytes()
    try:
        fixed, warped = load(str(fixed_path)), load(str(warped_path))
        png = edge_overlay_png(fixed.array, warped.array, fixed.affine, size)
    except (VoxregError, OSError, ValueError):
        return None
    cache.parent.mkdir(exist_ok=True)
    cache.write_bytes(png)
    return png


def _loader() -> Callable[[str], Any]:
    """``load(path)`` for thumbnails, keeping the last fixed scan (many pairs share one atlas)."""
    from voxreg import io

    kept: dict[str, Any] = {}

    def load(path: str) -> Any:
        if path.endswith("warped.nii.gz"):
            return io.load_image(path)
        if path not in kept:
            kept.clear()
            kept[path] = io.load_image(path)
        return kept[path]

    return load


# --------------------------------------------------------------------------- HTML

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; vertical-align: middle; }
th { background: #eee; }
th.qc { text-align: left; }
td.id, td.qc, td.engine { text-align: left; }
tr.flagged { background: #fde2e2; }
tr.flagged td.qc { color: #a00; font-weight: bold; }
tr.failed { background: #f3d0d0; }
td.thumb img { display: block; }
.summary { font-size: 1.1em; }
.rules { color: #555; max-width: 70em; }
"""


def _fmt(value: Any, spec: str) -> str:
    """A number formatted with ``spec``; '–' when unknown."""
    return "–" if value is None else format(value, spec)


def _row_html(pair_id: str, values: Mapping[str, Any], reasons: Sequence[str], png: bytes | None, dice: bool) -> str:
    """One ``<tr>`` of the pairs table."""
    status = values.get("status", "ok")
    classes = " ".join(c for c in ("flagged" if reasons else "", "failed" if status == "failed" else "") if c)
    image = (
        f'<img alt="{html.escape(pair_id)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        if png
        else "–"
    )
    qc_text = "<br>".join(html.escape(r) for r in reasons) or ("pending" if status == "pending" else "ok")
    if status == "failed" and values.get("error"):
        qc_text += f"<br><small>{html.escape(str(values['error']))}</small>"
    cells = [
        f'<td class="id">{html.escape(pair_id)}</td>',
        f'<td class="thumb">{image}</td>',
        f"<td>{html.escape(str(status))}</td>",
        f"<td>{_fmt(values.get('dice'), '.3f')}</td>" if dice else "",
        f"<td>{_fmt(values.get('ncc_before'), '.3f')} → {_fmt(values.get('ncc_after'), '.3f')}</td>",
        f"<td>{_fmt(values.get('folding_percent'), '.3f')}</td>",
        f"<td>{_fmt(values.get('sdlogj'), '.3f')}</td>",
        f'<td class="engine">{html.escape(str(values.get("engine") or "–"))}</td>',
        f"<td>{_fmt(values.get('seconds'), '.1f')}</td>",
        f'<td class="qc">{qc_text}</td>',
    ]
    attributes = f' id="pair-{html.escape(pair_id)}"' + (f' class="{classes}"' if classes else "")
    return f"<tr{attributes}>{''.join(cells)}</tr>"


def _rules_html(limits: Mapping[str, Any], thresholds: qc.QCThresholds) -> str:
    """The paragraph explaining the flags, with this cohort's limits."""
    known = {"dice": "Dice", "ncc_after": "NCC after", "sdlogj": "SD log J"}
    cohort = ", ".join(
        f"{label} {'<' if key != 'sdlogj' else '>'} {limits[key]:.3f}"
        for key, label in known.items()
        if limits.get(key) is not None
    )
    low, high = thresholds.singular_range
    return (
        '<p class="rules">A pair is flagged when its Dice or NCC after registration is far below the cohort, or its '
        f"SD of log J far above it (modified z-score beyond {thresholds.z} from the median, MAD-based, and at least "
        f"{thresholds.dice_floor} / {thresholds.ncc_floor} / {thresholds.sdlogj_floor} away; needs "
        f"{thresholds.min_cohort} pairs){'; this cohort: ' + cohort if cohort else ''}; when more than "
        f"{thresholds.folding_percent}% of voxels fold; or when its affine has a reflection, a singular value outside "
        f"[{low}, {high}] or a shear above {thresholds.shear}. Thumbnails: mid-slice of the warped moving scan with "
        "the edges of the fixed scan in red. NCC before: raw scans, before any alignment.</p>"
    )


def render_html(
    cohort: Mapping[str, Mapping[str, Any]],
    reasons: Mapping[str, Sequence[str]],
    thumbnails: Mapping[str, bytes | None],
    thresholds: qc.QCThresholds = qc.QCThresholds(),
    title: str = "voxreg register-batch: cohort QC",
) -> str:
    """The self-contained report page (no scripts, no external resources)."""
    dice = any(values.get("dice") is not None for values in cohort.values())
    flagged = [pair_id for pair_id in cohort if reasons.get(pair_id)]
    links = ", ".join(f'<a href="#pair-{html.escape(p)}">{html.escape(p)}</a>' for p in flagged)
    header = ["pair", "fixed edges / warped", "status", *(["Dice"] if dice else [])]
    header += ["NCC before → after", "folding %", "SD log J", "engine", "seconds"]
    rows = [
        _row_html(pair_id, values, reasons.get(pair_id, []), thumbnails.get(pair_id), dice)
        for pair_id, values in cohort.items()
    ]
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
            f"<h1>{html.escape(title)}</h1>",
            f'<p class="summary" id="summary">{len(cohort)} pairs, <b>{len(flagged)} flagged</b>'
            f"{': ' + links if links else ''}</p>",
            _rules_html(qc.cohort_limits(cohort, thresholds), thresholds),
            '<table id="pairs"><thead><tr>'
            + "".join(f"<th>{html.escape(h)}</th>" for h in header)
            + '<th class="qc">QC</th></tr></thead>',
            "<tbody>",
            *rows,
            "</tbody></table>",
            f"<p><small>written {time.strftime('%Y-%m-%d %H:%M:%S')} by voxreg</small></p>",
            "</body></html>",
        ]
    )


# --------------------------------------------------------------------------- files


def _table_with_qc(table: Path, rows: Sequence[Mapping[str, Any]], reasons: Mapping[str, Sequence[str]]) -> None:
    """Rewrite batch.csv with ``qc_flag`` (1/0, empty while pending) and ``qc_reasons``."""
    from voxreg.io import tables

    columns = [c for c in rows[0] if c not in QC_COLUMNS] + list(QC_COLUMNS)
    out = []
    for row in rows:
        found = reasons.get(str(row.get("id")), [])
        pending = row.get("status") == "pending"
        flag = "" if pending else int(bool(found))
        out.append(
            {**{c: row.get(c) for c in columns if c not in QC_COLUMNS}, "qc_flag": flag, "qc_reasons": "; ".join(found)}
        )
    tables.write_table(table, columns, out)


def write_report(
    outdir: str | Path, thresholds: qc.QCThresholds = qc.QCThresholds(), thumbnails: bool = True
) -> CohortReport:
    """Flag the pairs of a ``register-batch`` folder, add the QC columns to ``batch.csv`` and
    write ``report.html`` beside it. Raises VoxregError when batch.csv is missing or empty."""
    from voxreg.io import atomic_path, tables

    outdir = Path(outdir)
    table = outdir / "batch.csv"
    rows = tables.read_table(table, "batch table")
    if not rows or "id" not in rows[0]:
        raise VoxregError(f"{table}: no pair rows (run voxreg register-batch first)")
    cohort = qc.load_cohort(outdir, rows)
    reasons = qc.flag_cohort(cohort, thresholds)
    load = _loader()
    images = {
        str(row["id"]): thumbnail(outdir / str(row["id"]), row.get("fixed") or "", load) if thumbnails else None
        for row in rows
    }
    page = outdir / "report.html"
    with atomic_path(page) as tmp:
        Path(tmp).write_text(render_html(cohort, reasons, images, thresholds), encoding="utf-8")
    _table_with_qc(table, rows, reasons)
    return CohortReport(page, table, reasons)


def write_report_quietly(outdir: str | Path) -> CohortReport | str:
    """:func:`write_report`, returning the one-line reason instead of raising (a batch's
    pairs are done; a report problem must not turn them into a failure)."""
    try:
        return write_report(outdir)
    except Exception as exc:  # the report is an extra: its error is reported, not raised
        return f"cohort report not written: {short_reason(exc) if not isinstance(exc, VoxregError) else exc}"
