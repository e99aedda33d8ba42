"""Generation distillation: the captioning branch (student) learns from a frozen summarization
branch (teacher) token by token (HybridMED, arXiv 2410.00448), through both the soft token
distributions (Hinton et al. 2015) and the decoder hidden states.

Logits ``z_s, z_t (B, T, V)``, hidden states ``h_s, h_t (B, T, H)``, ``mask (B, T)`` bool (the
positions that count), temperature ``tau``, ``N = sum mask``::

    p_t = softmax(z_t / tau), log p_s = log_softmax(z_s / tau)      (over the vocabulary)
    KL_bt = sum_v p_t (log p_t - log p_s)
    loss = tau^2 * sum_{b, t} m_bt KL_bt / N  +  hidden_weight * sum_{b, t} m_bt mean_h (h_s - h_t)^2 / N

The ``tau^2`` keeps the soft term's gradient scale independent of ``tau`` (Hinton et al.). The
teacher's logits and hidden states are detached: no gradient reaches the teacher. An empty mask
gives 0. Computed in float32 (float64 inputs stay float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _working(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


class GenerationDistillLoss(nn.Module):
    """``(student_logits (B, T, V), teacher_logits (B, T, V), student_hidden (B, T, H), teacher_hidden (B, T, H), mask (B, T) bool) -> scalar``."""

    def __init__(self, temperature: float = 2.0, hidden_weight: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if hidden_weight < 0:
            raise ValueError(f"hidden_weight must be >= 0, got {hidden_weight}")
        self.temperature = temperature
        self.hidden_weight = hidden_weight

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        student_hidden: torch.Tensor,
        teacher_hidden: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        if student_logits.shape != teacher_logits.shape or student_logits.ndim != 3:
            raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} must be the same (B, T, V)")
        if student_hidden.shape != teacher_hidden.shape or student_hidden.shape[:2] != student_logits.shape[:2]:
            raise ValueError(f"student hidden {tuple(student_hidden.shape)} and teacher hidden {tuple(teacher_hidden.shape)} must be the same (B, T, H)")
        if mask.shape != student_logits.shape[:2]:
            raise ValueError(f"mask must be {tuple(student_logits.shape[:2])}, got {tuple(mask.shape)}")
        mask = mask.bool()
        t = self.temperature
        log_ps = F.log_softmax(_working(student_logits) / t, -1)
        log_pt = F.log_softmax(_working(teacher_logits.detach()) / t, -1).to(log_ps.dtype)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)  # (B, T)
        hs = _working(student_hidden)
        mse = ((hs - _working(teacher_hidden.detach()).to(hs.dtype)) ** 2).mean(-1)  # (B, T)
        n = mask.sum().clamp_min(1).to(kl.dtype)
        soft = torch.where(mask, kl, 0.0).sum() / n
        hidden = torch.where(mask, mse, 0.0).sum().to(kl.dtype) / n
        return t * t * soft + self.hidden_weight * hidden
