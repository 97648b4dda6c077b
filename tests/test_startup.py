"""Start-up cost: ``voxreg --help`` and ``import voxreg`` import no heavy library (issue 25).

Each check runs in a fresh interpreter: the test process itself has torch loaded already.
"""

import importlib
import json
import subprocess
import sys

import pytest

#: libraries that a command's help (or ``import voxreg``) must not import
HEAVY = ("torch", "nibabel", "SimpleITK", "scipy", "matplotlib")

#: what the ``voxreg`` console script does (``from voxreg.cli import app; app()``), then the
#: exit code, the help's first lines and the heavy modules loaded, as one json line
CONSOLE_DRIVER = (
    "import contextlib, io, json, sys\n"
    "from voxreg.cli import app\n"
    "out = io.StringIO()\n"
    "with contextlib.redirect_stdout(out):\n"
    "    try:\n"
    "        app(sys.argv[1:], prog_name='voxreg')\n"
    "    except SystemExit as exc:\n"
    "        code = exc.code\n"
    f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
    "print(json.dumps({'code': code, 'help': out.getvalue(), 'heavy': heavy}))\n"
)


def _python(*args: str) -> subprocess.CompletedProcess:
    """Run ``python *args`` in a fresh interpreter; fail with its stderr if it fails."""
    done = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--help"], "register-batch"),
        (["register", "--help"], "--moving-labels"),
        (["train", "--help"], "--batch-size"),
        (["models"], "brain-real"),  # lists the cards: no torch either
    ],
)
def test_console_script_help_imports_no_heavy_library(argv, expected):
    result = json.loads(_python("-c", CONSOLE_DRIVER, *argv).stdout.strip().splitlines()[-1])
    assert result["code"] == 0
    assert expected in result["help"]  # the help really ran
    assert result["heavy"] == []


def test_python_m_voxreg_cli_help_imports_no_heavy_library():
    # -X importtime names every module imported on stderr: the real ``-m`` entry, unmodified
    done = _python("-X", "importtime", "-m", "voxreg.cli", "--help")
    assert "register" in done.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "voxreg.cli.app" in imported  # the parsing sees the imports
    assert sorted(imported & set(HEAVY)) == []


def test_import_voxreg_imports_no_torch_and_its_names_load_on_use():
    code = (
        "import sys, voxreg\n"
        "print('torch' in sys.modules)\n"
        "from voxreg import register\n"
        "from voxreg.registration.pipeline import register as defined\n"
        "print(register is defined, 'torch' in sys.modules)\n"
    )
    lines = _python("-c", code).stdout.strip().splitlines()
    assert lines[-2:] == ["False", "True True"]


@pytest.mark.parametrize(
    "package",
    ["voxreg", "voxreg.core", "voxreg.io", "voxreg.losses", "voxreg.metrics", "voxreg.nn", "voxreg.training"],
)
def test_every_lazy_export_resolves(package):
    module = importlib.import_module(package)
    missing = [name for name in module.__all__ if not hasattr(module, name)]  # a typo in the lazy map
    assert missing == []
    assert set(module.__all__) <= set(dir(module))


def test_lazy_package_attributes_reach_submodules_and_reject_unknown_names():
    import voxreg

    assert voxreg.io.load_image is voxreg.load_image
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        voxreg.no_such_name  # noqa: B018


def test_the_register_path_imports_only_torch_before_its_first_line_of_work():
    """What `voxreg register` imports before it reads a scan: torch, and none of the other heavy
    libraries (they load when a stage needs them: nibabel to read, matplotlib for the figure).
    Measured: 0.2 s on top of torch's own 1.3 s import (issue 25's bound: 0.3 s)."""
    code = (
        "import sys, json\n"
        "import voxreg.cli.app, voxreg.registration.pipeline, voxreg.registration.outputs\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    assert json.loads(_python("-c", code).stdout.strip().splitlines()[-1]) == ["torch"]


def test_dice_never_imports_scipy_ndimage():
    """Dice (every registration with label maps) counts labels with numpy alone; scipy.ndimage,
    0.2 s to import, loads only for HD95's bounding boxes."""
    code = (
        "import sys, json\n"
        "import numpy as np\n"
        "from voxreg.metrics.overlap import dice_per_label, hd95\n"
        "a = np.zeros((8, 8, 8), np.int16); a[2:6, 2:6, 2:6] = 3\n"
        "dice = dice_per_label(a, np.roll(a, 1, axis=0))\n"
        "before = 'scipy.ndimage' in sys.modules\n"
        "hd95(a == 3, np.roll(a, 1, axis=0) == 3, (1.0, 1.0, 1.0))\n"
        "print(json.dumps([dice[3], before, 'scipy.ndimage' in sys.modules]))\n"
    )
    assert json.loads(_python("-c", code).stdout.strip().splitlines()[-1]) == [0.75, False, True]


def test_reading_nifti_and_training_never_import_simpleitk(tmp_path):
    """SimpleITK loads where it is used (NRRD/MetaImage/DICOM, ITK transform files): reading and
    writing NIfTI and importing the trainer leave it out (a GPU image without SimpleITK can train;
    0.12 s of start-up less); writing an ITK affine then imports it."""
    scan = tmp_path / "scan.nii.gz"
    code = (
        "import sys, json, numpy as np, nibabel as nib\n"
        f"nib.save(nib.Nifti1Image(np.ones((4, 5, 6), np.float32), np.eye(4)), {str(scan)!r})\n"
        "from voxreg import io\n"
        "import voxreg.training.trainer, voxreg.registration.pipeline\n"
        f"image = io.load_image({str(scan)!r})\n"
        f"io.save_image(image, {str(tmp_path / 'copy.nii.gz')!r})\n"
        "before = 'SimpleITK' in sys.modules\n"
        f"io.write_itk_affine({str(tmp_path / 'affine.txt')!r}, np.eye(4))\n"
        "print(json.dumps([before, 'SimpleITK' in sys.modules, image.shape]))\n"
    )
    assert json.loads(_python("-c", code).stdout.strip().splitlines()[-1]) == [False, True, [4, 5, 6]]


def test_a_command_imports_torch_with_the_collector_paused_then_frozen():
    code = (
        "import gc, json, sys\n"
        "from voxreg.cli.app import import_torch_without_gc\n"
        "light = [import_torch_without_gc(argv) for argv in ([], ['--help'], ['register', '--help'], ['models'])]\n"
        "light_torch = 'torch' in sys.modules\n"
        "done = import_torch_without_gc(['register', 'fixed.nii.gz', 'moving.nii.gz', '-o', 'out'])\n"
        "print(json.dumps([light, light_torch, done, 'torch' in sys.modules, gc.isenabled(), gc.get_freeze_count()]))\n"
    )
    light, light_torch, done, torch_loaded, enabled, frozen = json.loads(_python("-c", code).stdout.splitlines()[-1])
    assert light == [False, False, False, False] and not light_torch  # help and `models` stay light
    assert done and torch_loaded and enabled  # collecting again afterwards
    assert frozen > 50_000  # torch's objects are out of every later collection


def test_the_console_script_runs_main():
    from importlib.metadata import entry_points

    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "voxreg"]
    assert script.value == "voxreg.cli:main"


def test_register_ends_at_once_with_its_exit_code_and_complete_outputs(tmp_path):
    """``voxreg register`` ends through :func:`os._exit` (no teardown): the exit code, the
    summary and the one-line error on stderr and every output file survive it."""
    import numpy as np
    from tests.conftest import smooth_volume

    from voxreg.core.image import Image
    from voxreg.io import save_image

    fixed = smooth_volume((20, 24, 18), seed=1)
    for name, array in (("fixed", fixed), ("moving", np.roll(fixed, 1, axis=0))):
        save_image(Image(array, np.eye(4)), tmp_path / f"{name}.nii.gz")
    options = ["-o", str(tmp_path / "out"), "--engine", "instance", "--no-affine", "--no-figure", "--device", "cpu"]

    def register(moving: str) -> subprocess.CompletedProcess:
        command = ["register", str(tmp_path / "fixed.nii.gz"), str(tmp_path / moving), *options]
        return subprocess.run(
            [sys.executable, "-m", "voxreg.cli", *command],
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
        )

    done = register("moving.nii.gz")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "instance-optimisation on cpu" in done.stderr and "metrics.json" in done.stderr  # the summary (rich, stderr)
    values = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(values["outputs"])
    failed = register("nope.nii.gz")
    assert failed.returncode == 2 and "nope.nii.gz" in failed.stderr and "Traceback" not in failed.stderr
