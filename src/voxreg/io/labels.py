"""Names of anatomical label codes (FreeSurfer LUT) and standard evaluation label sets.

The built-in table (``voxreg/data/freesurfer_labels.tsv``) holds the FreeSurferColorLUT names
of the ``aseg`` subcortical codes, the corpus callosum (251-255) and the Desikan/DKT cortical
parcels (1000-1035 ``ctx-lh-*``, 2000-2035 ``ctx-rh-*``), with FreeSurfer 7 naming
(10/49 ``Left-/Right-Thalamus``, formerly ``*-Thalamus-Proper``).

- :func:`label_name` names one code (``"label <code>"`` when unknown).
- :func:`label_table` reads a user table (FreeSurfer LUT text or CSV ``code,name``).
- :func:`preset` gives the evaluation sets ``aseg30`` (VoxelMorph), ``dkt31`` (Mindboggle) and ``all``.
- :func:`hemisphere_pair_name` merges left/right structures into one name (``Left-X`` -> ``X``).
"""

from __future__ import annotations

import csv
import functools
import numbers
import os
import re
from importlib import resources
from pathlib import Path

from voxreg.core.errors import VoxregError

_DATA_FILE = "freesurfer_labels.tsv"

#: VoxelMorph's 30 evaluation structures (``data/labels.npz`` of voxelmorph/voxelmorph;
#: Balakrishnan et al. 2019, IEEE TMI, Fig. 3): left/right cerebral white matter and cortex,
#: lateral ventricle, cerebellum white matter and cortex, thalamus, caudate, putamen,
#: pallidum, hippocampus, amygdala, ventral DC, choroid plexus, plus 3rd and 4th ventricle,
#: brain stem and CSF. Accumbens (26/58) is not in it.
ASEG30: tuple[int, ...] = (
    2,
    3,
    4,
    7,
    8,
    10,
    11,
    12,
    13,
    14,
    15,
    16,
    17,
    18,
    24,
    28,
    31,
    41,
    42,
    43,
    46,
    47,
    49,
    50,
    51,
    52,
    53,
    54,
    60,
    63,
)

#: The 31 DKT31 cortical regions per hemisphere (Klein & Tourville 2012): Desikan codes
#: without 1001 bankssts, 1004 corpuscallosum, 1032 frontalpole, 1033 temporalpole.
_DKT31_LH: tuple[int, ...] = (1002, 1003, *range(1005, 1032), 1034, 1035)
DKT31: tuple[int, ...] = _DKT31_LH + tuple(code + 1000 for code in _DKT31_LH)

_PAIR_PREFIX = re.compile(r"^(left|right|ctx[-_][lr]h|[lr]h)[-_]", re.IGNORECASE)


@functools.lru_cache(maxsize=1)
def _builtin_table() -> dict[int, str]:
    text = resources.files("voxreg").joinpath("data", _DATA_FILE).read_text(encoding="utf-8")
    return _parse_lines(text.splitlines(), source=_DATA_FILE)


def builtin_table() -> dict[int, str]:
    """The built-in code -> FreeSurfer name table (a copy)."""
    return dict(_builtin_table())


def label_name(code: int, table: dict[int, str] | None = None) -> str:
    """Name of label ``code`` from ``table`` (default: the built-in FreeSurfer table);
    ``"label <code>"`` when unknown."""
    code = int(code)
    names = _builtin_table() if table is None else table
    return names.get(code, f"label {code}")


def _parse_lines(lines: list[str], source: str) -> dict[int, str]:
    """Parse ``code name ...`` lines (whitespace, tab or comma separated; ``#`` comments;
    a non-numeric first row is taken as a header)."""
    table: dict[int, str] = {}
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "," in line:
            fields = [f.strip() for f in next(csv.reader([line]))]
        else:
            fields = line.split()
        try:
            code = int(float(fields[0]))
        except ValueError:
            if not table:  # header row, e.g. "code,name" or "value,name,..."
                continue
            raise VoxregError(f"{source}: line {number}: '{fields[0]}' is not an integer label code") from None
        if len(fields) < 2 or not fields[1]:
            raise VoxregError(f"{source}: line {number}: label {code} has no name")
        table[code] = fields[1]
    return table


def label_table(path: str | os.PathLike) -> dict[int, str]:
    """Read a label table: FreeSurfer LUT text (``code name r g b a`` lines, ``#`` comments)
    or CSV/TSV with ``code,name`` in the first two columns (an optional header row)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise VoxregError(f"{path}: cannot read label table ({exc.strerror or exc})") from exc
    table = _parse_lines(text.splitlines(), source=str(path))
    if not table:
        raise VoxregError(f"{path}: no 'code name' rows found in label table")
    return table


def preset(name: str) -> dict[int, str]:
    """Label set ``name`` as code -> name.

    - ``"aseg30"``: VoxelMorph's 30 aseg structures (:data:`ASEG30`: 2 3 4 7 8 10 11 12 13 14
      15 16 17 18 24 28 31 41 42 43 46 47 49 50 51 52 53 54 60 63).
    - ``"dkt31"``: the 62 DKT31 cortical regions (:data:`DKT31`: 1002, 1003, 1005-1031, 1034,
      1035 and the same +1000 for the right hemisphere).
    - ``"all"``: the whole built-in table (including 0 Unknown).
    """
    key = name.strip().lower()
    if key == "all":
        return builtin_table()
    codes = {"aseg30": ASEG30, "dkt31": DKT31}.get(key)
    if codes is None:
        raise VoxregError(f"unknown label preset '{name}' (choose aseg30, dkt31 or all)")
    return {code: label_name(code) for code in codes}


def hemisphere_pair_name(code_or_name: int | str) -> str:
    """Structure name without its hemisphere, to group left and right: ``Left-X``/``Right-X``
    -> ``X``, ``ctx-lh-X``/``ctx-rh-X`` -> ``X``, ``*-Thalamus-Proper`` -> ``Thalamus`` (FreeSurfer 6 name);
    other names (``Brain-Stem``, ``CSF``) are returned unchanged. Accepts a code or a name."""
    if isinstance(code_or_name, numbers.Integral):
        name = label_name(int(code_or_name))
    else:
        name = str(code_or_name)
    stripped = _PAIR_PREFIX.sub("", name, count=1)
    if stripped != name and stripped.rstrip("*").lower() == "thalamus-proper":
        stripped = "Thalamus"
    return stripped or name
