"""Kernel (style) distillation: the distribution of the student's feature vectors matches the
teacher's under a kernel, a maximum mean discrepancy (MMD) between the two sets of positions.

Both features have ``C`` channels (the student's through a 1x1 adapter) and are pooled to ``N``
positions (``losses.affinity.pool_to_grid``), each position's vector L2-normalised: ``t_i, s_i``
in R^C. Per sample::

    MMD^2 = mean_ij k(t_i, t_j) + mean_ij k(s_i, s_j) - 2 mean_ij k(t_i, s_j)

- ``kernel="poly"`` (default), ``k(x, y) = (x . y)^2``: then ``MMD^2 = ||G_t - G_s||_F^2 / N^2``
  with the channel Gram (style) matrix ``G = sum_i f_i f_i^T`` ``(C, C)`` (Li et al. 2017,
  "Demystifying neural style transfer"): matching Gram matrices is this MMD. Computed from the
  Gram matrices, ``O(N C^2)``.
- ``kernel="rbf"``, ``k(x, y) = exp(-|x - y|^2 / (2 sigma^2))`` (all moments, not only the second),
  from the ``(N, N)`` kernel matrices.

The loss is the mean of ``MMD^2`` over the batch. Float32; the teacher carries no gradient.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from medalloy.losses.affinity import grid_for, pool_to_grid


def gram(f: torch.Tensor) -> torch.Tensor:
    """``(B, C, N) -> (B, C, C)``: ``sum_i f_i f_i^T`` over positions."""
    return f @ f.transpose(1, 2)


class KernelMMDLoss(nn.Module):
    """``(student (B, C, *sp_s), teacher (B, C, *sp_t)) -> scalar`` (see the module docstring)."""

    def __init__(self, kernel: str = "poly", max_positions: int = 256, sigma: float = 1.0):
        super().__init__()
        if kernel not in ("poly", "rbf"):
            raise ValueError(f"kernel must be 'poly' or 'rbf', not {kernel!r}")
        self.kernel, self.max_positions, self.sigma = kernel, max_positions, sigma

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if student.shape[:2] != teacher.shape[:2] or student.ndim != teacher.ndim:
            raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} need the same batch and channels (use an adapter)")
        grid = grid_for(tuple(min(a, b) for a, b in zip(student.shape[2:], teacher.shape[2:])), self.max_positions)
        s = F.normalize(pool_to_grid(student, grid), dim=1, eps=1e-8)
        t = F.normalize(pool_to_grid(teacher.detach(), grid), dim=1, eps=1e-8)
        n = s.shape[-1]
        if self.kernel == "poly":
            return ((gram(t) - gram(s)) ** 2).sum((1, 2)).mean() / (n * n)

        def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.exp(-(torch.cdist(a.transpose(1, 2), b.transpose(1, 2)) ** 2) / (2 * self.sigma**2))

        return (k(t, t).mean((1, 2)) + k(s, s).mean((1, 2)) - 2 * k(t, s).mean((1, 2))).mean()
