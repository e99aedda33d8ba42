"""Channel-wise distillation (CWD, Shu et al. ICCV 2021): each channel's activation map becomes a
distribution over positions, and the student's matches the teacher's.

Maps ``f_s, f_t`` ``(B, C, *sp)`` of the same shape (the distillation recipe gives the logits, as
the paper does for dense prediction; features of other widths would need a 1x1 adapter first),
temperature ``T``, ``N`` positions::

    P^t_bc = softmax_x(f_t[b, c] / T), log P^s_bc = log_softmax_x(f_s[b, c] / T)
    loss = T^2 * mean_{b, c} sum_x P^t_bcx (log P^t_bcx - log P^s_bcx)

(the paper sums over channels and divides by C; the mean over the batch as well). Float32; the
teacher carries no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ChannelWiseLoss(nn.Module):
    """``(student (B, C, *sp), teacher (B, C, *sp)) -> scalar``."""

    def __init__(self, temperature: float = 4.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if student.shape != teacher.shape:
            raise ValueError(f"student features {tuple(student.shape)} and teacher features {tuple(teacher.shape)} differ (use an adapter)")
        t = self.temperature
        zs, zt = student.float().flatten(2) / t, teacher.detach().float().flatten(2) / t
        kl = (F.softmax(zt, -1) * (F.log_softmax(zt, -1) - F.log_softmax(zs, -1))).sum(-1)
        return kl.mean() * t * t
