"""Dice + cross-entropy, the nnU-Net segmentation loss."""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss as _MonaiDiceCE
from torch import nn


class DiceCELoss(nn.Module):
    """``L = CE(softmax(z), y) + (1 - Dice)``, Dice computed over the batch (nnU-Net's "batch Dice")
    on the foreground classes:

    ``Dice = mean_k (2 sum_i p_ik y_ik + eps) / (sum_i p_ik + sum_i y_ik + eps)``, ``k`` = 1..K-1.

    Shapes: logits ``(B, K, *spatial)``, target ``(B, 1, *spatial)`` or ``(B, *spatial)`` class indices.
    Computed in fp32 even under autocast (the sums overflow bf16 precision).
    """

    def __init__(self, include_background: bool = False, batch: bool = True, smooth: float = 1e-5):
        super().__init__()
        self.loss = _MonaiDiceCE(include_background=include_background, to_onehot_y=True, softmax=True, batch=batch, smooth_nr=smooth, smooth_dr=smooth)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == logits.ndim - 1:
            target = target.unsqueeze(1)
        return self.loss(logits.float(), target.long())
