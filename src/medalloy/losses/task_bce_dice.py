"""Per-task sigmoid BCE + adaptive Tversky Dice over the tasks a sample is labelled for (Hermes).

For logits ``z`` and binary targets ``y`` of shape ``(B, T, *sp)``, task weights ``w`` ``(B, T)``
(0 for padding and for tasks a sample's dataset does not label: partial labels) and the global
task id of every slot ``k`` ``(B, T)`` (default: the slot index), with ``p = sigmoid(z)``::

    BCE_bt = mean_x [ -y log p - (1 - y) log(1 - p) ]
    TP_k = sum_{bt: k_bt = k} w_bt sum_x p y        (FP_k, FN_k alike: batch Dice per task)
    alpha_k = clamp(FP_k / (FP_k + FN_k), 0.2, 0.8)   (no gradient; 0.5 when FP_k + FN_k = 0)
    T_k = (TP_k + s) / (TP_k + alpha_k FP_k + (1 - alpha_k) FN_k + s)
    loss = sum_bt w BCE_bt / sum_bt w  +  mean over tasks k with sum w > 0 of (1 - T_k)

With ``exclusive=True`` the pixel-classification term treats a sample's annotated tasks as the
mutually exclusive classes of its label map (nnU-Net label maps give each pixel one class), with
background as a class of logit 0: for the slots ``A_b = {t: w_bt > 0}`` and the class
``c_bx = t`` where ``y_btx = 1`` (0 = background where no slot is 1)::

    CE_b = mean_x [ -log softmax([0, z_bt for t in A_b])[c_bx] ]
    loss = sum_b max_t(w_bt) CE_b / sum_b max_t(w_bt)  +  (the same Tversky term)

For a one-task sample this is exactly its BCE (``softmax([0, z]) = [1 - p, p]``); for several, the
classes compete for each pixel as in the experts' softmax, so the hardest of three adjacent
classes (ACDC's RV beside the myocardium) is not left undecided while its neighbours learn
(our choice; Hermes states the per-task BCE). At inference ``sigmoid(z_t) > 0.5`` still reads
"task t beats background", so prediction is unchanged.

The Dice term pools every sample that annotates a task (nnU-Net's batch Dice, ``s = 1e-5``): a
sample whose target is empty adds its false positives to its task's sums instead of scoring a Dice
of its own, which with a large smoothing term pushed hard towards "predict nothing" and let
structures absent from most patches collapse. ``alpha = 0.5`` is the soft Dice; the adaptive alpha
penalises whichever error the prediction currently makes more of. Computed in float32 whatever
the autocast dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TaskBCEDiceLoss(nn.Module):
    """``(logits (B, T, *sp), target (B, T, *sp) in {0, 1}, weight (B, T)[, task_ids (B, T)]) ->
    scalar``; keeps the BCE and Tversky-Dice parts in ``self.last`` for logging, as detached 0-d
    tensors on the logits' device (reading them is left to the engine's sync steps)."""

    def __init__(
        self, smooth: float = 1e-5, alpha_range: tuple[float, float] = (0.2, 0.8), adaptive: bool = True, num_tasks: int | None = None, exclusive: bool = False
    ):
        super().__init__()
        self.exclusive = exclusive
        self.num_tasks = num_tasks  # ids range over 0..num_tasks-1 (padding included); known up front, no device sync
        self.smooth = smooth
        self.alpha_range = alpha_range
        self.adaptive = adaptive
        self.last: dict[str, torch.Tensor] = {}

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        if logits.shape != target.shape or weight.shape != logits.shape[:2]:
            raise ValueError(f"need logits and target (B, T, *sp) and weight (B, T); got {tuple(logits.shape)}, {tuple(target.shape)}, {tuple(weight.shape)}")
        if task_ids is None:
            task_ids = torch.arange(logits.shape[1], device=logits.device).expand(logits.shape[0], -1)
        if task_ids.shape != weight.shape:
            raise ValueError(f"need task_ids (B, T) like weight; got {tuple(task_ids.shape)}")
        z = logits.float().flatten(2)
        y = target.float().flatten(2)
        w = weight.float()
        p = torch.sigmoid(z)
        # per task id: weighted sums over every (sample, slot) that annotates it
        ids = task_ids.long().flatten()
        n = self.num_tasks if self.num_tasks is not None else int(ids.max().item()) + 1
        pooled = torch.zeros(4, n, device=z.device)
        parts = torch.stack([(p * y).sum(-1), (p * (1 - y)).sum(-1), ((1 - p) * y).sum(-1), torch.ones_like(w)]) * w  # (4, B, T)
        pooled = pooled.index_add(1, ids, parts.flatten(1))
        tp, fp, fn, count = pooled
        if self.adaptive:
            with torch.no_grad():
                alpha = torch.where(fp + fn > 0, fp / (fp + fn).clamp_min(1e-12), torch.full_like(fp, 0.5)).clamp(*self.alpha_range)
        else:
            alpha = torch.full_like(fp, 0.5)
        tversky = (tp + self.smooth) / (tp + alpha * fp + (1 - alpha) * fn + self.smooth)
        present = (count > 0).float()
        dice_part = ((1 - tversky) * present).sum() / present.sum().clamp_min(1.0)
        if self.exclusive:
            bce_part = self._exclusive_ce(z, y, w)
        else:
            bce = F.binary_cross_entropy_with_logits(z, y, reduction="none").mean(-1)
            bce_part = (w * bce).sum() / w.sum().clamp_min(1e-12)
        self.last = {"bce": bce_part.detach(), "dice": dice_part.detach()}
        return bce_part + dice_part

    @staticmethod
    def _exclusive_ce(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Softmax CE over [background (logit 0), the sample's annotated slots]; ``z``, ``y`` (B, T, N)."""
        annotated = w > 0
        # unannotated and padded slots take no part: a logit no softmax can pick
        logits = torch.cat([torch.zeros_like(z[:, :1]), z.masked_fill(~annotated[..., None], -1e4)], 1)
        slots = torch.arange(1, z.shape[1] + 1, device=z.device, dtype=z.dtype)[None, :, None]
        cls = (y * annotated[..., None] * slots).amax(1).long()  # (B, N); one class per pixel in a label map
        ce = F.cross_entropy(logits, cls, reduction="none").mean(-1)  # (B,)
        sw = (w * annotated).amax(1)
        return (sw * ce).sum() / sw.sum().clamp_min(1e-12)
