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

- ``scope="batch"`` (cross-image relations, medalloy's choice for the journal version's
  "cross-site relational" distillation, after CIRKD, Yang et al. CVPR 2022): each image is pooled
  to ``n = max(4, max_positions // B)`` positions and the batch's ``B n`` positions form one set, so
  ``A`` is ``(1, B n, B n)``: besides each image's own relations (the diagonal blocks) the student
  learns how the teacher relates a position of one image to positions of the others, e.g. lung in
  one radiograph to lung and border in another. Weighting as above over the same set. A batch of
  one is the image scope at ``n`` positions. Under several processes the set is each process's own batch (no
  gather: relations to another process's images carry no gradient there).

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


def _as_one_set(f: torch.Tensor) -> torch.Tensor:
    """``(B, C, n) -> (1, C, B n)``, image by image."""
    return f.transpose(0, 1).reshape(1, f.shape[1], -1)


class SpatialAffinityLoss(nn.Module):
    """``(student (B, C_s, *sp_s), teacher (B, C_t, *sp_t)[, confidence (B, *sp)]) -> scalar``."""

    def __init__(self, max_positions: int = 256, weighting: str = "confidence", scope: str = "image"):
        super().__init__()
        if weighting not in ("none", "confidence"):
            raise ValueError(f"weighting must be 'none' or 'confidence', not {weighting!r}")
        if scope not in ("image", "batch"):
            raise ValueError(f"scope must be 'image' or 'batch', not {scope!r}")
        self.max_positions = max_positions
        self.weighting = weighting
        self.scope = scope

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, confidence: torch.Tensor | None = None) -> torch.Tensor:
        if student.shape[0] != teacher.shape[0] or student.ndim != teacher.ndim:
            raise ValueError(f"student features {tuple(student.shape)} and teacher features {tuple(teacher.shape)} do not pair up")
        per_image = self.max_positions if self.scope == "image" else max(4, self.max_positions // student.shape[0])
        grid = grid_for(tuple(min(a, b) for a, b in zip(student.shape[2:], teacher.shape[2:])), per_image)
        s, t = pool_to_grid(student, grid), pool_to_grid(teacher.detach(), grid)
        if self.scope == "batch":  # (B, C, n) -> (1, C, B n): one set of positions over the batch
            s, t = _as_one_set(s), _as_one_set(t)
        diff = (cosine_affinity(s) - cosine_affinity(t)) ** 2
        if self.weighting == "none" or confidence is None:
            return diff.mean()
        c = pool_to_grid(confidence.detach()[:, None], grid)[:, 0]  # (B, N)
        if self.scope == "batch":
            c = c.reshape(1, -1)
        pairs = c[:, :, None] * c[:, None, :]
        return (pairs * diff).sum() / pairs.sum().clamp_min(1e-12)
