"""Learning-rate schedules as pure functions of the step, so a resumed run needs no scheduler state."""

from __future__ import annotations

import math


def lr_factor(step: int, total: int, kind: str = "poly", warmup: int = 0, power: float = 0.9) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total`` steps.

    - warm-up: ``(step + 1) / warmup`` for ``step < warmup``;
    - ``poly`` (nnU-Net): ``(1 - t) ** power`` with ``t = (step - warmup) / (total - warmup)``;
    - ``cosine``: ``0.5 * (1 + cos(pi * t))``;
    - ``constant``: 1.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, max(0.0, (step - warmup) / span))
    if kind == "poly":
        return (1.0 - t) ** power
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if kind == "constant":
        return 1.0
    raise ValueError(f"unknown schedule '{kind}'")
