"""Losses, one concept a module, each with its formula in the docstring."""

from medalloy.losses.dice_ce import DiceCELoss
from medalloy.losses.task_bce_dice import TaskBCEDiceLoss

__all__ = ["DiceCELoss", "TaskBCEDiceLoss"]
