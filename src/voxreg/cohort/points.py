"""Points through a saved registration, in both directions, as ANTs maps them.

Direction rule (DESIGN.md): a registration's transforms map **fixed-space points to
moving-space points**. A fixed world point ``p`` goes to ``A(p + u(p))`` (``u`` the field
in world mm at ``p``, ``A`` the affine stage, fixed -> moving): the same map that pulls the
moving scan's intensities onto the fixed grid, and what ``antsApplyTransformsToPoints`` does
with the forward list ``-t field_itk.nii.gz -t affine.txt``. The inverse maps a moving point
``q`` to ``phi^-1(A^-1 q)``, ``phi^-1(z) = z + u_inv(z)`` (``field_inverse.nii.gz``), as
``-t [affine.txt,1] -t field_itk_inverse.nii.gz``.

The field is interpolated linearly as ITK's displacement field transform does: edge values
up to half a voxel outside the fixed grid, no displacement beyond. Points CSVs follow
``antsApplyTransformsToPoints``: header ``x,y,z,t`` (2D: ``x,y``) in LPS millimetres, other
columns kept as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from voxreg import io
from voxreg.core.errors import VoxregError
from voxreg.core.grid import Grid, apply_matrix, check_affine
from voxreg.io.files import PathLike
from voxreg.io.tables import read_table, write_table
from voxreg.registration.outputs import read_inverse_field

AXES = ("x", "y", "z")


# --------------------------------------------------------------------------- maths


def displace(points: np.ndarray, fixed_affine: np.ndarray, field: np.ndarray) -> np.ndarray:
    """World points ``(n, 3)`` (RAS mm) moved by a displacement ``field`` ``(ndim, *S)`` in
    voxels of the grid of ``fixed_affine``: ``p -> world(x + u(x))`` for ``x`` the voxel of
    ``p``, ``u`` linear (ITK's rule outside the grid, see the module docstring). A 2D field
    moves points within their plane and keeps any offset from it."""
    grid = Grid(field.shape[1:], fixed_affine)
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    voxels = grid.world_to_voxel(points)
    sizes = np.asarray(grid.shape, dtype=np.float64)
    inside = np.all((voxels >= -0.5) & (voxels < sizes - 0.5), axis=1)
    displacement = np.stack(
        [
            ndimage.map_coordinates(np.asarray(field[d], np.float64), voxels.T, order=1, mode="nearest")
            for d in range(grid.ndim)
        ],
        axis=1,
    )
    displacement[~inside] = 0.0
    return points + grid.voxel_to_world(voxels + displacement) - grid.voxel_to_world(voxels)


def map_points(
    points: np.ndarray, fixed_affine: np.ndarray, field: np.ndarray, world_matrix: np.ndarray | None = None
) -> np.ndarray:
    """Fixed world points ``(n, 3)`` (RAS mm) -> moving world points: ``A(p + u(p))``, the
    field first, then the affine ``world_matrix`` (fixed -> moving world; none = identity)."""
    moved = displace(points, fixed_affine, field)
    return moved if world_matrix is None else apply_matrix(world_matrix, moved)


def map_points_inverse(
    points: np.ndarray, fixed_affine: np.ndarray, inverse: np.ndarray, world_matrix: np.ndarray | None = None
) -> np.ndarray:
    """Moving world points ``(n, 3)`` (RAS mm) -> fixed world points: ``phi^-1(A^-1 q)``, the
    inverse affine first, then the inverse field ``inverse`` ``(ndim, *S)`` (fixed voxels)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    in_fixed = points if world_matrix is None else apply_matrix(np.linalg.inv(world_matrix), points)
    return displace(in_fixed, fixed_affine, inverse)


# --------------------------------------------------------------------------- a registration folder


@dataclass
class SavedRegistration:
    """The transforms ``voxreg register`` wrote into ``folder``: the voxreg field (fixed
    voxels) with the fixed affine, the affine stage (RAS, fixed -> moving; None without
    affine.txt) and, loaded on first use, the inverse field."""

    folder: Path
    field: np.ndarray
    fixed_affine: np.ndarray
    world_matrix: np.ndarray | None
    _inverse: np.ndarray | None = None

    @classmethod
    def load(cls, folder: PathLike) -> SavedRegistration:
        """Read ``folder/field.nii.gz`` and, when present, ``folder/affine.txt``."""
        folder = Path(folder)
        if not folder.is_dir():
            raise VoxregError(f"{folder}: not a folder (give the output folder of voxreg register)")
        field_path = folder / "field.nii.gz"
        if not field_path.exists():
            raise VoxregError(f"{folder}: no field.nii.gz (not an output folder of voxreg register)")
        field, fixed_affine = io.load_field(field_path)
        affine_path = folder / "affine.txt"
        world_matrix = check_affine(io.read_itk_affine(affine_path), str(affine_path)) if affine_path.exists() else None
        return cls(folder, field, fixed_affine, world_matrix)

    @property
    def ndim(self) -> int:
        """2 or 3."""
        return int(self.field.shape[0])

    def inverse(self) -> np.ndarray:
        """The inverse field: ``field_inverse.nii.gz``, or computed when an older run lacks it."""
        if self._inverse is None:
            self._inverse = read_inverse_field(self.folder / "field.nii.gz")[0]
        return self._inverse

    def map(self, points: np.ndarray, inverse: bool = False) -> np.ndarray:
        """World points ``(n, 3)`` (RAS mm): fixed -> moving, or moving -> fixed with ``inverse``."""
        if inverse:
            return map_points_inverse(points, self.fixed_affine, self.inverse(), self.world_matrix)
        return map_points(points, self.fixed_affine, self.field, self.world_matrix)


# --------------------------------------------------------------------------- points CSVs


@dataclass
class PointTable:
    """A points CSV: its ``columns`` as written, its rows (strings) and, per axis, the
    column holding that coordinate."""

    path: Path
    columns: list[str]
    rows: list[dict[str, str]]
    axes: dict[str, str]


def read_points_csv(path: PathLike, ndim: int) -> PointTable:
    """Read an ANTs points CSV (header with ``x,y[,z]`` in any case, one point a row);
    ``ndim``-D registrations need the first ``ndim`` axes. One-line VoxregError on a missing
    file, missing columns, extra cells, or no points."""
    path = Path(path)
    rows = read_table(path, what="points CSV")
    if not rows:
        raise VoxregError(f"{path}: no points (expected a header x,y,z,t and one point a row)")
    columns = [name for name in rows[0] if name is not None]
    by_name = {name.strip().lower(): name for name in columns}
    needed = AXES[:ndim]
    missing = [axis for axis in needed if axis not in by_name]
    if missing:
        raise VoxregError(
            f"{path}: a points CSV needs columns {','.join(needed)} (missing {','.join(missing)}; "
            f"found {','.join(columns) or 'none'})"
        )
    for line, row in enumerate(rows, start=2):
        if None in row:
            raise VoxregError(f"{path}: line {line} has more cells than the header")
    axes = {axis: by_name[axis] for axis in AXES if axis in by_name}
    return PointTable(path, columns, rows, axes)


def table_points(table: PointTable, ndim: int, plane: float = 0.0) -> np.ndarray:
    """The table's points ``(n, 3)`` as written (LPS or RAS); a 2D table without ``z``
    lies at ``z = plane``. Raises a one-line VoxregError naming the line of a bad number."""
    points = np.full((len(table.rows), 3), plane, dtype=np.float64)
    for line, row in enumerate(table.rows, start=2):
        for index, axis in enumerate(AXES):
            if axis not in table.axes or (index >= ndim and not (row[table.axes[axis]] or "").strip()):
                continue
            text = (row[table.axes[axis]] or "").strip()
            try:
                points[line - 2, index] = float(text)
            except ValueError:
                raise VoxregError(f"{table.path}: line {line}: {axis} is not a number ({text!r})") from None
    if not np.all(np.isfinite(points)):
        raise VoxregError(f"{table.path}: point coordinates must be finite numbers")
    return points


def write_points_csv(path: PathLike, table: PointTable, points: np.ndarray, ndim: int) -> Path:
    """Write ``table`` with its first ``ndim`` coordinate columns replaced by ``points``
    (``(n, 3)``, full precision); every other column as read."""
    rows = []
    for row, point in zip(table.rows, np.asarray(points, dtype=np.float64)):
        out: dict[str, str | float] = dict(row)
        for index, axis in enumerate(AXES[:ndim]):
            out[table.axes[axis]] = float(point[index])
        rows.append(out)
    return write_table(path, table.columns, rows)


def lps_ras(points: np.ndarray) -> np.ndarray:
    """LPS <-> RAS (its own inverse): x and y change sign."""
    return np.asarray(points, dtype=np.float64) * np.array([-1.0, -1.0, 1.0])


def transform_points_csv(
    folder: PathLike, points_csv: PathLike, output: PathLike, inverse: bool = False, ras: bool = False
) -> tuple[Path, int]:
    """Map the points of ``points_csv`` (ANTs CSV, LPS mm; RAS with ``ras``) through the
    registration saved in ``folder``: fixed -> moving, or moving -> fixed with ``inverse``.
    Writes ``output`` atomically; returns it and the number of points."""
    saved = SavedRegistration.load(folder)
    table = read_points_csv(points_csv, saved.ndim)
    given = table_points(table, saved.ndim, plane=float(saved.fixed_affine[2, 3]))  # z is the same in LPS and RAS
    world = given if ras else lps_ras(given)
    mapped = saved.map(world, inverse=inverse)
    write_points_csv(output, table, mapped if ras else lps_ras(mapped), saved.ndim)
    return Path(output), len(table.rows)
