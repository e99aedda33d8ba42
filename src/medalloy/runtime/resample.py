"""Resampling in numpy, as the PyTorch path resamples (``data/preprocess.py``): linear with
``align_corners=False`` (and, for 2D images that shrink, the antialiasing triangle filter that
``F.interpolate(..., antialias=True)`` and PIL share), nearest-exact for labels. Each axis is one
weight matrix ``(out, in)``, applied in turn (the filters are separable)."""

from __future__ import annotations

import numpy as np


def linear_weights(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)``: linear interpolation at half-pixel centres, clamped at the edges."""
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    w = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    np.add.at(w, (rows, i0), 1.0 - frac)
    np.add.at(w, (rows, i1), frac)
    return w


def antialias_weights(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)``: the triangle filter widened by the shrink factor (support 1 when growing),
    each row normalised to sum 1."""
    scale = n_in / n_out
    support = scale if scale >= 1.0 else 1.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        taps = np.maximum(0.0, 1.0 - np.abs((np.arange(lo, hi) - center + 0.5) * inv))
        total = taps.sum()
        if total > 0:
            w[i, lo:hi] = taps / total
    return w


def resize_linear(x: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """``x`` ``(..., *spatial)`` float to ``size`` on its last ``len(size)`` axes: linear, with
    antialiasing on every axis when a 2D image shrinks along any (as ``preprocess._resize``)."""
    spatial = x.shape[-len(size) :]
    if tuple(spatial) == tuple(size):
        return x
    aa = len(size) == 2 and any(s < n for s, n in zip(size, spatial))
    out = x.astype(np.float64)
    for k, (n_in, n_out) in enumerate(zip(spatial, size)):
        axis = x.ndim - len(size) + k
        w = antialias_weights(n_in, n_out) if aa else linear_weights(n_in, n_out)
        out = np.moveaxis(np.tensordot(out, w, axes=([axis], [1])), -1, axis)
    return out.astype(np.float32)


def resize_nearest(x: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """``x`` ``(..., *spatial)`` to ``size`` by nearest-exact sampling (labels)."""
    spatial = x.shape[-len(size) :]
    for k, (n_in, n_out) in enumerate(zip(spatial, size)):
        idx = np.minimum(np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)
        x = np.take(x, idx, axis=x.ndim - len(size) + k)
    return x
