"""Spatial affinity distillation: the student reproduces how the teacher relates positions to each
other (pairwise "relation" knowledge), whatever the two networks' widths.

Features ``f_s (B, C_s, *sp_s)`` and ``f_t (B, C_t, *sp_t)`` of one stage are average-pooled to the
same grid of ``N <= max_positions`` positions (:func:`pool_to_grid`), each position's channel vector
L2-normalised, and the cosine affinity taken per sample::

    A_ij = f_i . f_j          (B, N, N), for teacher and student alike

- ``weighting="none"`` (pairwise distillation, SKD, Liu et al. CVPR 2019)::

      loss = mean_{b, i, j} (A^s_bij - A^t_bij)^2

- ``weighting="confidence"`` (medalloy's *adaptive* affinity, docs/methods/distillation.md): each pair
  counts by how sure the teacher is at both positions, ``c`` ``(B, *sp)`` in [0, 1] (e.g. one minus
  the normalised entropy of the teacher's prediction), pooled to the grid::

      loss = sum_{b, i, j} c_bi c_bj (A^s_bij - A^t_bij)^2 / sum_{b, i, j} c_bi c_bj

  so relations the teacher itself gets wrong on an unfamiliar site pull less.

Computed in float32; the teacher's features and the confidence carry no gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def grid_for(spatial: tuple[int, ...], max_positions: int) -> tuple[int, ...]:
    """The pooled grid: each axis ``min(size, side)`` with ``side = floor(max_positions ** (1 / dim))``."""
    side = max(1, int(math.floor(max_positions ** (1.0 / len(spatial)) + 1e-9)))
    return tuple(min(int(s), side) for s in spatial)


def pool_to_grid(f: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """``(B, C, *sp) -> (B, C, N)`` by adaptive average pooling to ``grid`` (``N = prod(grid)``)."""
    pool = F.adaptive_avg_pool2d if f.ndim == 4 else F.adaptive_avg_pool3d
    return pool(f.float(), grid).flatten(2)


def cosine_affinity(f: torch.Tensor) -> torch.Tensor:
    """``(B, C, N) -> (B, N, N)``: cosine similarity of every pair of positions."""
    f = F.normalize(f, dim=1, eps=1e-8)
    return f.transpose(1, 2) @ f


class SpatialAffinityLoss(nn.Module):
    """``(student (B, C_s, *sp_s), teacher (B, C_t, *sp_t)[, confidence (B, *sp)]) -> scalar``."""

    def __init__(self, max_positions: int = 256, weighting: str = "confidence"):
        super().__init__()
        if weighting not in ("none", "confidence"):
            raise ValueError(f"weighting must be 'none' or 'confidence', not {weighting!r}")
        self.max_positions = max_positions
        self.weighting = weighting

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, confidence: torch.Tensor | None = None) -> torch.Tensor:
        if student.shape[0] != teacher.shape[0] or student.ndim != teacher.ndim:
            raise ValueError(f"student features {tuple(student.shape)} and teacher features {tuple(teacher.shape)} do not pair up")
        grid = grid_for(tuple(min(a, b) for a, b in zip(student.shape[2:], teacher.shape[2:])), self.max_positions)
        diff = (cosine_affinity(pool_to_grid(student, grid)) - cosine_affinity(pool_to_grid(teacher.detach(), grid))) ** 2
        if self.weighting == "none" or confidence is None:
            return diff.mean()
        c = pool_to_grid(confidence.detach()[:, None], grid)[:, 0]  # (B, N)
        pairs = c[:, :, None] * c[:, None, :]
        return (pairs * diff).sum() / pairs.sum().clamp_min(1e-12)
