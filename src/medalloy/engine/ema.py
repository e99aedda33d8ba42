"""Exponential moving average of weights: ``shadow <- d * shadow + (1 - d) * weight`` after each step."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class EMA:
    """Shadow copies of a module's floating-point parameters and buffers."""

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError("EMA decay must be in (0, 1)")
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items() if v.dtype.is_floating_point}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for k, v in module.state_dict().items():
            if k in self.shadow:
                self.shadow[k].mul_(self.decay).add_(v.detach(), alpha=1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Strict: every shadow key, of its shape; ``ValueError`` names the first key that differs."""
        missing = [k for k in self.shadow if k not in state]
        extra = [k for k in state if k not in self.shadow]
        if missing or extra:
            what = f"lacks {len(missing)} keys ({missing[0]}, ...)" if missing else f"has {len(extra)} unknown keys ({extra[0]}, ...)"
            raise ValueError(f"EMA state {what}")
        for k, v in state.items():
            if v.shape != self.shadow[k].shape:
                raise ValueError(f"EMA state key {k} has shape {tuple(v.shape)}, the module {tuple(self.shadow[k].shape)}")
        for k in self.shadow:
            self.shadow[k].copy_(state[k])

    @contextlib.contextmanager
    def applied(self, module: nn.Module):
        """Temporarily load the averaged weights into ``module`` (for validation or export)."""
        backup = {k: v.detach().clone() for k, v in module.state_dict().items() if k in self.shadow}
        module.load_state_dict({**module.state_dict(), **self.shadow})
        try:
            yield module
        finally:
            module.load_state_dict({**module.state_dict(), **backup})
