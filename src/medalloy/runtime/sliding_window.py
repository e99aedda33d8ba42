"""Sliding-window inference in numpy, as MONAI's ``sliding_window_inference`` does it for the
PyTorch path (``engine/inference.py``): windows of the plan's patch at the given overlap, the last
one flush with the far edge, Gaussian weights (sigma = patch / 8, clamped at 1e-3), inputs smaller
than the patch padded symmetrically with zeros, and the logits averaged by those weights."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np


def gaussian_weights(patch: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """``patch``-shaped float32 weights: a product of 1D Gaussians centred on the window."""
    w = np.ones((), np.float32)
    for n in patch:
        x = np.arange(-(n - 1) / 2.0, (n - 1) / 2.0 + 1, dtype=np.float32)
        g = np.exp(x**2 / np.float32(-2 * (n * sigma_scale) ** 2)).astype(np.float32)
        w = np.multiply.outer(w, g)
    return np.maximum(w, max(float(w.min()), 1e-3)).astype(np.float32)


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Window starts along one axis of ``size`` (>= ``patch``): every ``patch * (1 - overlap)``, the last flush with the end."""
    step = patch if patch == size else max(int(patch * (1 - overlap)), 1)
    count = next((d for d in range(math.ceil(size / step)) if d * step + patch >= size), 0) + 1
    return [i * step - max(i * step + patch - size, 0) for i in range(count)]


def sliding_window(x: np.ndarray, patch: Sequence[int], run: Callable[[np.ndarray], np.ndarray], overlap: float = 0.5, batch: int = 4) -> np.ndarray:
    """``x`` ``(N, C, *spatial)`` -> logits ``(N, K, *spatial)``; ``run`` maps windows ``(B, C, *patch)`` to ``(B, K, *patch)``."""
    patch = list(patch)
    pads = [(max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2) for s, p in zip(x.shape[2:], patch)]
    if any(a or b for a, b in pads):
        x = np.pad(x, [(0, 0), (0, 0), *pads])
    size = x.shape[2:]
    corners = list(itertools.product(*(window_starts(s, p, overlap) for s, p in zip(size, patch))))
    weights = gaussian_weights(patch)
    windows = [(n, c) for n in range(x.shape[0]) for c in corners]
    out: np.ndarray | None = None
    count = np.zeros(size, np.float32)
    for c in corners:
        count[tuple(slice(s, s + p) for s, p in zip(c, patch))] += weights
    for first in range(0, len(windows), batch):
        chunk = windows[first : first + batch]
        logits = run(np.ascontiguousarray(np.stack([x[(n, slice(None), *(slice(s, s + p) for s, p in zip(c, patch)))] for n, c in chunk])))
        if out is None:
            out = np.zeros((x.shape[0], logits.shape[1], *size), np.float32)
        for (n, c), pred in zip(chunk, logits):
            out[(n, slice(None), *(slice(s, s + p) for s, p in zip(c, patch)))] += pred * weights
    assert out is not None
    out /= count
    return out[(slice(None), slice(None), *(slice(a, a + s - a - b) for (a, b), s in zip(pads, size)))]
