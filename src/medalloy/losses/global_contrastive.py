"""Global image <-> text contrastive loss (CLIP / ConVIRT symmetric InfoNCE), as HybridMED's
image <-> impression alignment (arXiv 2410.00448).

Image embeddings ``I (B, D)`` and text embeddings ``T (B, D)`` of ``B`` paired samples are
L2-normalised, and scaled by a learnable logit scale ``s = min(exp(logit_scale), max_scale)``
(``logit_scale`` initialised to ``log(1 / init_temperature)``, so the temperature is ``1 / s``)::

    L = s * I T^T                                                         (B, B)
    loss = 0.5 * (mean_i CE(L[i, :], y_i) + mean_j CE(L[:, j], y'_j))     image->text + text->image

With no ``positives``, ``y_i`` is the one-hot ``i``: only the diagonal pair matches. With a
``positives (B, B)`` bool matrix (``positives[i, j]``: image ``i`` and text ``j`` match, e.g. their
texts are identical), the targets are uniform over the positives, a soft cross entropy::

    y_ij  = positives[i, j] / sum_k positives[i, k]           (row i, image -> text)
    y'_ji = positives[i, j] / sum_k positives[k, j]           (column j, text -> image)
    CE(l, y) = -sum_k y_k log_softmax(l)_k

Why: many reports share the same impression (e.g. just "COVID-19" or "No acute findings"). With
one-hot targets such samples are each other's negatives: image ``i`` is pushed away from text ``j``
although it says the same as its own. With soft targets, matching any of them is right. Note: when
the positives' text embeddings are *exactly* equal (a deterministic text encoder in eval mode), the
uniform soft target gives the same value and the same gradients as the one-hot one (the duplicate
columns carry equal logits, so both targets put the same total weight on them); it changes the
loss when their embeddings differ (dropout in train mode, text augmentation, positives by meaning,
e.g. the same label). Every diagonal entry must be True (each sample matches its own text), else
``ValueError``.

Computed in float32 (float64 inputs stay float64), outside autocast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _check_positives(positives: torch.Tensor, b: int) -> torch.Tensor:
    if positives.shape != (b, b):
        raise ValueError(f"positives must be ({b}, {b}), got {tuple(positives.shape)}")
    if positives.dtype != torch.bool:
        raise ValueError(f"positives must be a bool tensor, got {positives.dtype}")
    if not bool(positives.diagonal().all()):
        raise ValueError("positives must include the diagonal: every sample matches its own text")
    return positives


def symmetric_info_nce(logits: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over already-scaled ``logits (B, B)`` (rows: images, columns: texts).

    ``0.5 * (CE over rows + CE over columns)``, with one-hot diagonal targets, or with targets uniform
    over ``positives (B, B)`` bool (diagonal included) when given; see the module docstring.
    """
    b = logits.shape[0]
    if logits.shape != (b, b):
        raise ValueError(f"logits must be square (B, B), got {tuple(logits.shape)}")
    if positives is None:
        target = torch.arange(b, device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    pos = _check_positives(positives, b).to(logits.dtype)
    row_target = pos / pos.sum(1, keepdim=True)  # image i -> texts j
    col_target = pos.t() / pos.t().sum(1, keepdim=True)  # text j -> images i
    row = -(row_target * F.log_softmax(logits, 1)).sum(1).mean()
    col = -(col_target * F.log_softmax(logits.t(), 1)).sum(1).mean()
    return 0.5 * (row + col)


def _working_dtype(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


class GlobalContrastiveLoss(nn.Module):
    """``(image (B, D), text (B, D)[, positives (B, B) bool]) -> scalar`` (see the module docstring)."""

    logit_scale: torch.Tensor

    def __init__(self, init_temperature: float = 0.07, learnable: bool = True, max_scale: float = 100.0):
        super().__init__()
        if init_temperature <= 0:
            raise ValueError(f"init_temperature must be > 0, got {init_temperature}")
        if max_scale <= 0:
            raise ValueError(f"max_scale must be > 0, got {max_scale}")
        init = torch.tensor(math.log(1.0 / init_temperature), dtype=torch.float32)
        if learnable:
            self.logit_scale = nn.Parameter(init)
        else:
            self.register_buffer("logit_scale", init)
        self.max_scale = max_scale

    def scale(self) -> torch.Tensor:
        """``s = min(exp(logit_scale), max_scale)``, a 0-d tensor with the parameter's gradient path."""
        return self.logit_scale.exp().clamp(max=self.max_scale)

    @property
    def temperature(self) -> float:
        """The current temperature ``1 / s``."""
        return 1.0 / float(self.scale().detach())

    def forward(self, image: torch.Tensor, text: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
        if image.ndim != 2 or image.shape != text.shape:
            raise ValueError(f"image {tuple(image.shape)} and text {tuple(text.shape)} must both be (B, D)")
        with torch.autocast(device_type=image.device.type, enabled=False):
            i = F.normalize(_working_dtype(image), dim=1, eps=1e-8)
            t = F.normalize(_working_dtype(text), dim=1, eps=1e-8)
            logits = self.scale().to(i.dtype) * (i @ t.t())
            return symmetric_info_nce(logits, positives)
