"""Marginal Dice + cross-entropy for a partially labelled dataset (Shi et al., "Marginal loss and
exclusion loss for partially supervised multi-organ segmentation", MedIA 2021).

A dataset that annotates only some of the network's foreground classes (Shenzhen's lung beside a
JSRT model's lung and heart) calls every unannotated class background. The marginal form merges
the network's probabilities of the unannotated classes into background before comparing:

    p = softmax(z)                                     z: logits (B, K, *spatial)
    q_0 = p_0 + sum_{k in U} p_k                       U: the foreground classes the dataset lacks
    q_k = p_k                                          k in A: the classes it annotates
    L = CE(log q, y) + (1 - Dice)

with ``log q`` computed as ``logsumexp`` of the log-softmax over each group (stable), and the Dice
nnU-Net's batch Dice over the annotated foreground classes (as :class:`~medalloy.losses.dice_ce.DiceCELoss`)::

    Dice = mean_{k in A} (2 sum_i q_ik y_ik + eps) / (sum_i q_ik + sum_i y_ik + eps)

So predicting an unannotated class where the dataset says "background" costs nothing, and the
annotated classes are learnt as usual. With ``A`` every foreground class it is DiceCELoss exactly.

Shapes: logits ``(B, K, *spatial)``; target ``(B, 1, *spatial)`` or ``(B, *spatial)`` class indices
of the network (0 or a member of ``annotated``). Computed in fp32 even under autocast.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn


class MarginalDiceCELoss(nn.Module):
    """``(logits (B, K, *sp), target (B[, 1], *sp)) -> scalar``; ``annotated``: the foreground class
    indices (1..K-1) the dataset labels."""

    def __init__(self, num_classes: int, annotated: Sequence[int], smooth: float = 1e-5):
        super().__init__()
        annotated = sorted(set(int(k) for k in annotated))
        if not annotated or annotated[0] < 1 or annotated[-1] >= num_classes:
            raise ValueError(f"annotated classes must be in 1..{num_classes - 1} and not empty, got {annotated}")
        self.num_classes = num_classes
        self.annotated = annotated
        self.background = [0] + [k for k in range(1, num_classes) if k not in annotated]
        remap = torch.zeros(num_classes, dtype=torch.long)  # network class -> merged class (0: background)
        for i, k in enumerate(annotated, start=1):
            remap[k] = i
        self.register_buffer("remap", remap, persistent=False)
        self.dice = DiceLoss(include_background=False, to_onehot_y=True, softmax=False, batch=True, smooth_nr=smooth, smooth_dr=smooth)

    def merged_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """``(B, K, *sp) -> (B, 1 + |A|, *sp)``: log q, background first, then the annotated classes."""
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[1]} classes, the loss was built for {self.num_classes}")
        lp = torch.log_softmax(logits.float(), dim=1)
        bg = torch.logsumexp(lp[:, self.background], dim=1, keepdim=True)
        return torch.cat([bg, lp[:, self.annotated]], dim=1)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == logits.ndim:
            target = target[:, 0]
        target = target.long()
        merged = self.remap.to(target.device)[target.clamp(0, self.num_classes - 1)]
        # a class this dataset does not annotate (or none of the network's) cannot be a target
        if bool(((target != 0) & (merged == 0)).any()) or bool((target >= self.num_classes).any()):
            raise ValueError(f"target holds a class outside background and the annotated {self.annotated}")
        with torch.autocast(device_type=logits.device.type, enabled=False):
            log_q = self.merged_log_probs(logits)
            return F.nll_loss(log_q, merged) + self.dice(log_q.exp(), merged.unsqueeze(1))
