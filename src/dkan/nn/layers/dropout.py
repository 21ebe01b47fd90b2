"""Dropout: torch's own by default; an opt-in CPU mask drawn with numpy (``DKANConfig(numpy_dropout=True)``).

On a CPU, torch's Bernoulli draw costs about 8 ns per element; a numpy ``uint16`` draw costs a fraction of
that, which measured a few percent of a ``small``-preset training step (docs/method.md). The default is torch's
:class:`torch.nn.Dropout`, which composes with ``torch.compile`` and every device. With the numpy mask, the
numpy generator is seeded from torch's global generator on every call, so ``torch.manual_seed`` still makes
training reproducible; other devices and ``inplace=True`` use torch's dropout.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["Dropout", "use_numpy_dropout"]


class Dropout(nn.Dropout):
    """:class:`torch.nn.Dropout` with an optional numpy-drawn mask on CPU (same module interface, no state).

    Parameters
    ----------
    p
        Drop probability.
    inplace
        As in :class:`torch.nn.Dropout` (always uses torch's dropout).
    numpy_mask
        Draw the CPU mask with numpy (faster on a CPU); the drop probability is then ``p`` rounded to a multiple
        of ``1 / 65536``. Switch a whole model with :func:`use_numpy_dropout`.
    """

    def __init__(self, p: float = 0.5, inplace: bool = False, *, numpy_mask: bool = False) -> None:
        super().__init__(p, inplace)
        self.numpy_mask = bool(numpy_mask)

    def extra_repr(self) -> str:
        """Module summary line, with the mask source."""
        return f"{super().extra_repr()}, numpy_mask={self.numpy_mask}"

    def forward(self, x: Tensor) -> Tensor:
        """Drop elements of ``x`` in training mode; identity in eval mode."""
        if not self.numpy_mask or not self.training or self.p == 0.0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        if self.p >= 1.0:
            return x * 0.0
        seed = int(torch.randint(0, 2**62, (1,)).item())
        bits = np.random.default_rng(seed).integers(0, 65536, size=tuple(x.shape), dtype=np.uint16)
        scale = np.float32(1.0 / (1.0 - self.p))
        mask = np.where(bits >= round(self.p * 65536), scale, np.float32(0.0))
        return x * torch.from_numpy(mask).to(x.dtype)


def use_numpy_dropout(module: nn.Module, enabled: bool = True) -> int:
    """Set ``numpy_mask`` on every :class:`Dropout` inside ``module``; returns how many were set."""
    layers = [m for m in module.modules() if isinstance(m, Dropout)]
    for layer in layers:
        layer.numpy_mask = bool(enabled)
    return len(layers)
