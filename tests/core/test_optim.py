"""core.optim.Adam: torch.optim.Adam's updates without torch.optim's class (and its import cost)."""

import subprocess
import sys

import pytest
import torch

from voxreg.core.optim import Adam


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
def test_same_updates_as_torch_optim_adam_with_changing_lr_and_eps(device):
    torch.manual_seed(0)
    start = [torch.randn(3, 4, dtype=torch.float64, device=device), torch.randn(5, dtype=torch.float64, device=device)]
    ours = [p.clone().requires_grad_(True) for p in start]
    theirs = [p.clone().requires_grad_(True) for p in start]
    mine, reference = Adam(ours, lr=0.1), torch.optim.Adam(theirs, lr=0.1, foreach=False)
    for step in range(12):
        lr, eps = 0.1 / (1 + step), 10.0 ** -(3 + step % 4)
        mine.lr, mine.eps = lr, eps
        for group in reference.param_groups:
            group["lr"], group["eps"] = lr, eps
        for params in (ours, theirs):
            loss = (params[0] ** 2).sum() * (step + 1) + torch.sin(params[1]).sum()
            loss.backward()
        mine.step()
        reference.step()
        mine.zero_grad()
        reference.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in ours)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_explicit_gradients_and_a_missing_one():
    param = torch.zeros(2, requires_grad=True)
    adam = Adam([param], lr=0.5)
    adam.step([torch.tensor([1.0, -2.0])])
    torch.testing.assert_close(param.detach(), torch.tensor([-0.5, 0.5]))  # Adam's first step: lr * sign
    with pytest.raises(ValueError, match="no gradient"):
        adam.step()


def test_a_registration_never_imports_torch_dynamo():
    # torch.optim's optimiser classes import torch._dynamo on first use: ~1 s per process
    code = (
        "import sys, numpy as np, voxreg\n"
        "from voxreg.core.image import Image\n"
        "from voxreg.core.synthetic import make_synthetic_pair\n"
        "g = np.meshgrid(*[np.linspace(-1, 1, 24)] * 3, indexing='ij')\n"
        "blob = np.exp(-4 * sum(c**2 for c in g)).astype(np.float32)\n"
        "pair = make_synthetic_pair(Image(blob, np.eye(4)), max_displacement=2.0, seed=0)\n"
        "voxreg.register(pair.fixed, pair.moving, engine='instance', metrics=True, device='cpu')\n"
        "voxreg.register(pair.fixed, pair.moving, model='brain', refine=5, metrics=False, device='cpu')\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"
