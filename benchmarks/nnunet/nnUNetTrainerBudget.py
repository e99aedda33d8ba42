"""nnU-Net's default trainer with a configurable training length, for a fixed wall-clock budget.

Only the three length settings differ from ``nnUNetTrainer``; network, batch and patch size,
augmentation, loss, optimiser and its poly learning-rate schedule are nnU-Net's defaults. They are
read from the environment when the trainer is built, so ``nnUNetv2_train`` and
``nnUNetv2_predict`` use it unchanged (``-tr nnUNetTrainerBudget``):

    MEDALLOY_NNUNET_ITERS      training iterations per epoch      (nnU-Net default 250)
    MEDALLOY_NNUNET_VAL_ITERS  validation iterations per epoch    (default: ITERS // 5, as 250:50)
    MEDALLOY_NNUNET_EPOCHS     epochs; the poly LR decays over them (nnU-Net default 1000)

nnU-Net finds this file through its ``nnUNet_extTrainer`` environment variable (a folder of external
trainers), which ``benchmarks/nnunet_peer.py`` sets to this folder.
"""

from __future__ import annotations

import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


def _positive_int(name: str, default: int) -> int:
    """An environment variable as a positive integer (``default`` when unset)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    value = int(raw)
    if value < 1:
        raise ValueError(f"{name}={raw}: must be a positive integer")
    return value


class nnUNetTrainerBudget(nnUNetTrainer):
    """``nnUNetTrainer`` whose epochs and iterations per epoch come from the environment."""

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = _positive_int("MEDALLOY_NNUNET_ITERS", self.num_iterations_per_epoch)
        # nnU-Net validates 50 batches per 250 training ones; keep that ratio unless told otherwise.
        self.num_val_iterations_per_epoch = _positive_int("MEDALLOY_NNUNET_VAL_ITERS", max(1, self.num_iterations_per_epoch // 5))
        self.num_epochs = _positive_int("MEDALLOY_NNUNET_EPOCHS", self.num_epochs)
