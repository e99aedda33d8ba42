"""Logit distillation: the student matches the teacher's temperature-softened outputs (Hinton et al. 2015).

Softmax models, logits ``z_s, z_t`` of shape ``(B, K, *sp)``, temperature ``T``::

    p_t = softmax(z_t / T), log p_s = log_softmax(z_s / T)   (over the K classes, per position)
    loss = T^2 * mean_{b, x} sum_k p_t (log p_t - log p_s)

Sigmoid models (one independent map per task, as the universal model), per task a Bernoulli::

    q_t = sigmoid(z_t / T), q_s = sigmoid(z_s / T)
    KL_btx = q_t (log q_t - log q_s) + (1 - q_t) (log(1 - q_t) - log(1 - q_s))
    loss = T^2 * sum_{b, t} w_bt mean_x KL_btx / sum_{b, t} w_bt

with task weights ``w`` ``(B, T)`` (1 where the slot holds a task, 0 for padding; default all 1).
The ``T^2`` keeps the gradient's scale independent of ``T``. Computed in float32; the teacher's
logits carry no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LogitKDLoss(nn.Module):
    """``(student (B, K, *sp), teacher (B, K, *sp)[, weight (B, K)]) -> scalar`` (see the module docstring)."""

    def __init__(self, temperature: float = 2.0, binary: bool = False):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.binary = binary

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if student.shape != teacher.shape:
            raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ")
        t = self.temperature
        zs, zt = student.float() / t, teacher.detach().float() / t
        if not self.binary:
            kl = (F.softmax(zt, 1) * (F.log_softmax(zt, 1) - F.log_softmax(zs, 1))).sum(1)
            return kl.mean() * t * t
        # log sigmoid(z) and log(1 - sigmoid(z)) = log sigmoid(-z), stable for large |z|
        qt = torch.sigmoid(zt)
        kl = qt * (F.logsigmoid(zt) - F.logsigmoid(zs)) + (1 - qt) * (F.logsigmoid(-zt) - F.logsigmoid(-zs))
        per_task = kl.flatten(2).mean(-1)  # (B, T)
        w = torch.ones_like(per_task) if weight is None else weight.float()
        return (per_task * w).sum() / w.sum().clamp_min(1e-12) * t * t
