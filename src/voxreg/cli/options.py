"""Command-line options shared by several commands (one definition each)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Device = Annotated[str, typer.Option("--device", help="auto (CUDA when available), cpu or cuda[:N].")]
Model = Annotated[
    Path | None,
    typer.Option("--model", "-m", help="Network checkpoint, or the name of a shipped model (voxreg models)."),
]
Engine = Annotated[
    str,
    typer.Option(
        "--engine", help="auto (the shipped model when its card covers the scans, else instance), network or instance."
    ),
]
Similarity = Annotated[str, typer.Option("--similarity", "-s", help="Similarity: ncc, mse or mi.")]
Lambda = Annotated[
    float | None,
    typer.Option(
        "--lambda",
        "-l",
        help="Regularisation weight (default: the similarity's own; after the shipped model, its card's refinement λ).",
    ),
]
Refine = Annotated[
    int | None,
    typer.Option(
        "--refine",
        help="Instance-optimisation steps after the network (default: the shipped model's own; 0 after a checkpoint).",
    ),
]
Passes = Annotated[
    int | None,
    typer.Option(
        "--passes",
        help="Apply the network N times, each pass to the moving scan warped by the passes before "
        "(default: the shipped model's own; 1 after a checkpoint). brain-real: 2 passes +0.028 Dice for ~0.45 s.",
    ),
]
NoInverse = Annotated[
    bool,
    typer.Option(
        "--no-inverse",
        help="Skip the inverse fields (not computed; voxreg warp --inverse computes it from field.nii.gz when needed).",
    ),
]
NoItk = Annotated[bool, typer.Option("--no-itk", help="Skip the ITK/ANTs copies of the fields (field_itk*.nii.gz).")]
