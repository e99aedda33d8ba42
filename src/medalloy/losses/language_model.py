"""Language-modelling loss for report generation (HybridMED's summarization and captioning branches,
arXiv 2410.00448): token cross entropy over the non-pad targets.

Logits ``z (B, T, V)`` and targets ``y (B, T)`` (long), already shifted by the caller, so ``z[:, t]``
predicts ``y[:, t]``; ``m_bt = [y_bt != pad_id]``, label smoothing ``eps``::

    l_bt = -(1 - eps) log softmax(z_bt)[y_bt] - eps * mean_v log softmax(z_bt)[v]
    loss = sum_{b, t} m_bt l_bt / max(1, sum_{b, t} m_bt)

so finite logits at pad positions change neither the value nor the gradient (an inf or NaN there
still gives NaN gradients at that position), and an all-pad batch gives 0 (with a gradient path,
not NaN). Computed in float32 (float64 logits stay float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LanguageModelLoss(nn.Module):
    """``(logits (B, T, V), targets (B, T) long) -> scalar`` (see the module docstring)."""

    def __init__(self, pad_id: int = 0, label_smoothing: float = 0.0):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.pad_id = pad_id
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.ndim != 3 or logits.shape[:2] != targets.shape:
            raise ValueError(f"logits {tuple(logits.shape)} must be (B, T, V) with targets {tuple(targets.shape)} (B, T)")
        z = logits if logits.dtype == torch.float64 else logits.float()
        per_token = F.cross_entropy(z.flatten(0, 1), targets.flatten().long(), ignore_index=self.pad_id, label_smoothing=self.label_smoothing, reduction="none")
        mask = targets.flatten() != self.pad_id
        per_token = torch.where(mask, per_token, 0.0)  # exact zeros at pads, whatever their logits
        return per_token.sum() / mask.sum().clamp_min(1).to(per_token.dtype)
