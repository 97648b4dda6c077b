"""Command-line interface: thin typer commands over the registration, training and evaluation layers.

Every user error (:class:`voxreg.errors.VoxregError`) is printed as one line on stderr
and exits with code 2, without a traceback.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import typer

from voxreg.cli.batch import register_batch
from voxreg.cli.evaluate import evaluate, tune_lambda
from voxreg.cli.options import Device, Engine, Lambda, Model, NoInverse, NoItk, Passes, Refine, Similarity
from voxreg.cli.points import transform_points
from voxreg.cli.preprocess import preprocess
from voxreg.cli.progress import console, progress_bar, user_errors
from voxreg.cli.template import template
from voxreg.cli.train import train

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="voxreg: deformable registration of 3D/2D medical images."
)


@app.command()
@user_errors
def register(
    fixed: Path = typer.Argument(..., help="Fixed (reference) scan."),
    moving: Path = typer.Argument(..., help="Moving scan, warped onto the fixed one."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder."),
    model: Model = None,
    engine: Engine = "auto",
    similarity: Similarity = "ncc",
    lam: Lambda = None,
    refine: Refine = None,
    passes: Passes = None,
    device: Device = "auto",
    moving_labels: list[Path] = typer.Option(
        [], "--moving-labels", help="Label map(s) on the moving scan to carry along."
    ),
    fixed_labels: Path | None = typer.Option(None, "--fixed-labels", help="Label map of the fixed scan (for Dice)."),
    no_affine: bool = typer.Option(False, "--no-affine", help="Skip the affine pre-alignment (scans already aligned)."),
    affine_only: bool = typer.Option(False, "--affine-only", help="Stop after the affine pre-alignment."),
    no_figure: bool = typer.Option(False, "--no-figure", help="Skip figure.png."),
    no_inverse: NoInverse = False,
    no_itk: NoItk = False,
) -> None:
    """Register MOVING to FIXED (affine, then deformable) and write warped image, labels,
    fields and their inverses (voxreg + ITK/ANTs), affine.txt, metrics.json and figure.png."""
    from voxreg.io.staging import REGISTER_OUTPUTS, staged_outputs
    from voxreg.registration import outputs as writer
    from voxreg.registration import pipeline as api

    inputs = [fixed, moving, model, fixed_labels, *moving_labels]
    with _interruptible(), staged_outputs(output, inputs, REGISTER_OUTPUTS, remove_stale=True) as stage:
        with progress_bar("registering") as update:
            result = api.register(
                fixed,
                moving,
                model=model,
                engine=engine,
                similarity=similarity,
                lam=lam,
                refine=refine,
                passes=passes,
                device=device,
                moving_labels=moving_labels or None,
                fixed_labels=fixed_labels,
                affine=not no_affine,
                affine_only=affine_only,
                progress=update,
                metrics=True,
                defer_metrics=True,  # computed while the files are compressed
            )
        files = writer.OutputFiles(inverse=not no_inverse, itk=not no_itk)
        names = writer.write_outputs(result, stage, figure=not no_figure, files=files)
    _print_summary(result.metrics, {key: output / name for key, name in names.items()})


@contextmanager
def _interruptible() -> Iterator[None]:
    """SIGTERM / SIGINT during a staged run: one line, exit 143 / 130 (after cleanup)."""
    from voxreg.io.staging import Terminated

    try:
        yield
    except Terminated:
        typer.echo("voxreg: terminated; no output written", err=True)
        raise typer.Exit(code=143) from None
    except KeyboardInterrupt:
        typer.echo("voxreg: interrupted; no output written", err=True)
        raise typer.Exit(code=130) from None


def _print_summary(values: dict, written: dict[str, Path]) -> None:
    """One line of timings and metrics (those measured), then the files written."""
    from voxreg.registration.outputs import stage_measures

    line = f"{values['engine']} on {values['device']}: {values['registration_seconds']:.2f} s"
    if "folding_percent" in values:
        line += f", folding {values['folding_percent']:.3f}%"
    for measure in stage_measures(values, dice_name="mean Dice"):
        line += ", " + measure
    console.print(line)
    for name, path in written.items():
        console.print(f"  {name:14s} {path}")


@app.command()
@user_errors
def warp(
    field: Path = typer.Argument(..., help="field.nii.gz written by voxreg register."),
    image: Path = typer.Argument(..., help="Image or label map on the moving scan's grid."),
    output: Path = typer.Option(..., "-o", "--output", help="Output file (.nii.gz, .nrrd, ...)."),
    nearest: bool = typer.Option(False, "--nearest", help="Force nearest neighbour (default for integer label maps)."),
    linear: bool = typer.Option(False, "--linear", help="Force linear interpolation (default for intensity images)."),
    affine: Path | None = typer.Option(
        None, "--affine", help="ITK affine text (default: affine.txt next to FIELD, if any)."
    ),
    no_affine: bool = typer.Option(False, "--no-affine", help="Ignore affine.txt next to FIELD."),
    inverse: bool = typer.Option(
        False, "--inverse", help="Apply the registration backwards: IMAGE in the fixed space onto --reference's grid."
    ),
    reference: Path | None = typer.Option(
        None, "--reference", help="With --inverse: the moving scan, whose grid the output takes."
    ),
    device: Device = "auto",
) -> None:
    """Apply a saved displacement FIELD (and the affine.txt beside it) to IMAGE. Integer
    label maps are resampled with nearest neighbour in their own dtype unless --linear.
    With --inverse, map IMAGE from the fixed scan's space (e.g. atlas labels) onto the moving
    scan (--reference) through the inverse affine and field_inverse.nii.gz beside FIELD."""
    from voxreg import io
    from voxreg.core.errors import VoxregError
    from voxreg.io.staging import staged_outputs
    from voxreg.registration import outputs as writer
    from voxreg.registration import pipeline as api

    if nearest and linear:
        raise VoxregError("--nearest and --linear contradict each other: choose one")
    if inverse and reference is None:
        raise VoxregError("--inverse needs --reference MOVING: the moving scan whose grid the output takes")
    if reference is not None and not inverse:
        raise VoxregError("--reference is only used with --inverse (a forward warp takes the field's grid)")
    if affine is None and not no_affine and (field.parent / "affine.txt").exists():
        affine = field.parent / "affine.txt"
    folder = output.parent if str(output.parent) else Path(".")
    inputs = [field, image, affine, reference, writer.inverse_field_path(field) if inverse else None]
    with _interruptible(), staged_outputs(folder, inputs, outputs=(output.name,), lock=False) as stage:
        mode = True if nearest else (False if linear else None)
        if inverse:
            warped = writer.apply_inverse_field(field, image, reference, mode, affine, device)
        else:
            warped = api.apply_field(field, image, nearest=mode, affine_path=affine, device=device)
        io.save_image(warped, stage / output.name)
    if affine is not None:
        order = f"the inverse of {affine} then of {field.name}" if inverse else f"{affine} then {field.name}"
        console.print(f"applied {order} (composite of voxreg register)")
    console.print(f"wrote {output}")


app.command("preprocess")(preprocess)


app.command("train")(train)


app.command("tune-lambda")(tune_lambda)


@app.command()
@user_errors
def demo(
    output: Path = typer.Option(Path("voxreg_demo_output"), "-o", "--output", help="Output folder."),
    device: Device = "auto",
    max_displacement: float = typer.Option(5.0, help="Largest displacement of the synthetic deformation (voxels)."),
) -> None:
    """Register the MNI152 template (nilearn wheel) to a known synthetic deformation of itself."""
    from voxreg.cli.demo import run_demo
    from voxreg.core.config import check_number
    from voxreg.core.errors import VoxregError

    try:
        check_number("--max-displacement", max_displacement, low=0.0, low_inclusive=False)
    except ValueError as exc:
        raise VoxregError(str(exc)) from None

    run_demo(output, device=device, max_displacement=max_displacement, console=console)


app.command("evaluate")(evaluate)


@app.command()
@user_errors
def models() -> None:
    """List the models shipped inside voxreg (usable offline with --model NAME)."""
    from voxreg.nn.shipped import shipped_models

    shipped = shipped_models()
    if not shipped:
        typer.echo("no model ships in this version yet (register uses instance optimisation); see docs/models.md")
        return
    for model in shipped:
        default = " (default)" if model.card.get("default") else ""
        default += " (default of --engine network)" if model.card.get("network_default") else ""
        typer.echo(f"{model.name}{default}: {model.card['description']} [{model.ndim}D, {model.size_mb:.1f} MB]")
        details = [f"refinement {model.card['refine']} steps" if "refine" in model.card else ""]
        covers = model.card.get("covers", {})
        if covers:
            role = "used by default for" if model.card.get("default") else "measured on"
            details.append(
                f"{role} voxels up to {covers['max_spacing_mm']:g} mm and fields of view up to "
                f"{covers['max_extent_mm']:g} mm"
            )
        if model.card.get("symmetric_inference"):
            details.append("symmetric inference (both directions averaged)")
        if "training_steps" in model.card:
            details.append(f"{model.card['training_steps']} training steps")
        typer.echo("  " + "; ".join(d for d in details if d))
        if covers.get("inputs_measured"):
            typer.echo(f"  inputs measured: {covers['inputs_measured']}")
        if model.card.get("passes_dice"):
            typer.echo(f"  {_passes_line(model.card)}")


def _passes_line(card: dict) -> str:
    """`voxreg models`' line on a card's measured cascade (``passes_dice``: Dice by passes)."""
    default = int(card.get("passes", 1))
    measured = sorted((int(n), float(dice)) for n, dice in card["passes_dice"].items())
    scores = ", ".join(f"{n}: {dice:.3f}" + (" (default)" if n == default else "") for n, dice in measured)
    return f"--passes N (the network applied N times), mean Dice of {card.get('passes_measured_on', 'held-out pairs')}: {scores}"


#: commands that run without torch (their start-up imports nothing heavy)
_COMMANDS_WITHOUT_TORCH = frozenset({"models"})


def import_torch_without_gc(argv: Sequence[str]) -> bool:
    """Before a command that needs torch (not a help request, not :data:`_COMMANDS_WITHOUT_TORCH`):
    import torch with Python's cyclic garbage collector paused, then freeze the objects it made
    (later collections skip them) and resume collecting. Each of the ~1,500 collections that
    torch's import otherwise triggers rescans what it made so far: 0.3 s of a command's
    start-up on this 2-core machine. True when torch was imported here."""
    words = [arg for arg in argv if not arg.startswith("-")]
    if not words or words[0] in _COMMANDS_WITHOUT_TORCH or {"--help", "-h"} & set(argv) or "torch" in sys.modules:
        return False
    collecting = gc.isenabled()
    gc.disable()
    try:
        import torch  # noqa: F401
    finally:
        gc.freeze()
        if collecting:
            gc.enable()
    return True


#: commands whose process ends without Python's teardown once they are done (their outputs
#: are closed and moved into place by then): freeing a registration's ~2 GB of arrays and
#: torch's modules one by one took 0.3-0.7 s after the last file was written (1 mm pair, this
#: 2-core machine); :func:`os._exit` leaves that to the kernel
_COMMANDS_EXITING_AT_ONCE = frozenset({"register", "register-batch"})


def main() -> None:  # pragma: no cover - console entry
    """The ``voxreg`` console script and ``python -m voxreg.cli``."""
    argv = sys.argv[1:]
    import_torch_without_gc(argv)
    try:
        app()
    except SystemExit as done:
        words = [arg for arg in argv if not arg.startswith("-")]
        if words and words[0] in _COMMANDS_EXITING_AT_ONCE:
            exit_at_once(done.code)
        raise


def exit_at_once(code: int | str | None) -> None:
    """End the process with ``code`` (SystemExit's meaning) after flushing stdout and stderr,
    skipping the interpreter's teardown (garbage collection of every object, atexit hooks)."""
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (``voxreg register ... | head -1``) or stream
            pass
    os._exit(code or 0)


if __name__ == "__main__":  # pragma: no cover
    main()


app.command("register-batch")(register_batch)


app.command("transform-points")(transform_points)


app.command("template")(template)
