"""Adam for registration-time optimisation (affine stage, instance optimisation).

The update is torch's own: the functional :func:`torch.optim.adam.adam`, with the state
(moments, step count) held here. The optimiser *classes* of ``torch.optim`` import
``torch._dynamo`` the first time one is built in a process (1.0-1.4 s once with torch 2.13:
more than a whole network registration of a 1 mm brain pair); the functional update does
not. Training keeps ``torch.optim`` (its start-up is noise over hours).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor
from torch.optim.adam import adam

__all__ = ["Adam"]


class Adam:
    """Adam (no weight decay, no AMSGrad) over a list of tensors, the same updates as
    ``torch.optim.Adam(params, lr, betas, eps)``. ``lr`` and ``eps`` are plain attributes:
    a schedule sets them between steps."""

    def __init__(
        self, params: Iterable[Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        self.params = list(params)
        self.lr, self.betas, self.eps = float(lr), betas, float(eps)
        self._first = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self._second = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self._steps = [torch.tensor(0.0) for _ in self.params]  # as torch.optim keeps them (CPU float)

    def zero_grad(self) -> None:
        """Drop the parameters' gradients (``set_to_none``)."""
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def step(self, grads: Sequence[Tensor] | None = None) -> None:
        """One update from ``grads`` (default: each parameter's ``.grad``)."""
        found = [p.grad for p in self.params] if grads is None else list(grads)
        if any(g is None for g in found):
            raise ValueError("Adam.step: a parameter has no gradient")
        adam(
            self.params,
            [g for g in found if g is not None],
            self._first,
            self._second,
            [],
            self._steps,
            foreach=False,  # the other options keep torch's defaults (no capture, fusion or scaling)
            amsgrad=False,
            beta1=self.betas[0],
            beta2=self.betas[1],
            lr=self.lr,
            weight_decay=0.0,
            eps=self.eps,
            maximize=False,
        )
