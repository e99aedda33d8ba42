"""Losses, one concept a module, each with its formula in the docstring."""

from medalloy.losses.affinity import SpatialAffinityLoss
from medalloy.losses.cwd import ChannelWiseLoss
from medalloy.losses.dice_ce import DiceCELoss
from medalloy.losses.kernel import KernelMMDLoss
from medalloy.losses.logit_kd import LogitKDLoss
from medalloy.losses.task_bce_dice import TaskBCEDiceLoss

__all__ = ["ChannelWiseLoss", "DiceCELoss", "KernelMMDLoss", "LogitKDLoss", "SpatialAffinityLoss", "TaskBCEDiceLoss"]
