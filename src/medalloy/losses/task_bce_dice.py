"""Per-task sigmoid BCE + adaptive Tversky Dice over the tasks a sample is labelled for (Hermes).

For logits ``z`` and binary targets ``y`` of shape ``(B, T, *sp)`` and task weights ``w`` ``(B, T)``
(0 for padding and for tasks a sample's dataset does not label: partial labels), with
``p = sigmoid(z)`` and sums over positions per (sample, task)::

    BCE_bt = mean_x [ -y log p - (1 - y) log(1 - p) ]
    TP = sum p y,   FP = sum p (1 - y),   FN = sum (1 - p) y
    alpha = clamp(FP / (FP + FN), 0.2, 0.8)   (no gradient; 0.5 when FP + FN = 0)
    T_bt = (TP + s) / (TP + alpha FP + (1 - alpha) FN + s)
    loss = sum_bt w (BCE_bt + 1 - T_bt) / sum_bt w

``alpha = 0.5`` is the soft Dice; the adaptive alpha penalises whichever error the prediction
currently makes more of. Computed in float32 whatever the autocast dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TaskBCEDiceLoss(nn.Module):
    """``(logits (B, T, *sp), target (B, T, *sp) in {0, 1}, weight (B, T)) -> scalar``; also
    keeps the BCE and Tversky-Dice parts in ``self.last`` for logging, as detached 0-d tensors on
    the logits' device (reading them is left to the engine's sync steps)."""

    def __init__(self, smooth: float = 1.0, alpha_range: tuple[float, float] = (0.2, 0.8), adaptive: bool = True):
        super().__init__()
        self.smooth = smooth
        self.alpha_range = alpha_range
        self.adaptive = adaptive
        self.last: dict[str, torch.Tensor] = {}

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if logits.shape != target.shape or weight.shape != logits.shape[:2]:
            raise ValueError(f"need logits and target (B, T, *sp) and weight (B, T); got {tuple(logits.shape)}, {tuple(target.shape)}, {tuple(weight.shape)}")
        z = logits.float().flatten(2)
        y = target.float().flatten(2)
        w = weight.float()
        bce = F.binary_cross_entropy_with_logits(z, y, reduction="none").mean(-1)
        p = torch.sigmoid(z)
        tp = (p * y).sum(-1)
        fp = (p * (1 - y)).sum(-1)
        fn = ((1 - p) * y).sum(-1)
        if self.adaptive:
            with torch.no_grad():
                alpha = torch.where(fp + fn > 0, fp / (fp + fn).clamp_min(1e-12), torch.full_like(fp, 0.5))
                alpha = alpha.clamp(*self.alpha_range)
        else:
            alpha = torch.full_like(fp, 0.5)
        tversky = (tp + self.smooth) / (tp + alpha * fp + (1 - alpha) * fn + self.smooth)
        total = w.sum().clamp_min(1e-12)
        bce_part = (w * bce).sum() / total
        dice_part = (w * (1 - tversky)).sum() / total
        self.last = {"bce": bce_part.detach(), "dice": dice_part.detach()}
        return bce_part + dice_part
