"""Losses, one concept a module, each with its formula in the docstring."""

from medalloy.losses.affinity import SpatialAffinityLoss
from medalloy.losses.cwd import ChannelWiseLoss
from medalloy.losses.dice_ce import DiceCELoss
from medalloy.losses.generation_distill import GenerationDistillLoss
from medalloy.losses.global_contrastive import GlobalContrastiveLoss
from medalloy.losses.kernel import KernelMMDLoss
from medalloy.losses.language_model import LanguageModelLoss
from medalloy.losses.logit_kd import LogitKDLoss
from medalloy.losses.marginal_dice_ce import MarginalDiceCELoss
from medalloy.losses.task_bce_dice import TaskBCEDiceLoss
from medalloy.losses.token_alignment import TokenAlignmentLoss

__all__ = [
    "ChannelWiseLoss",
    "DiceCELoss",
    "GenerationDistillLoss",
    "GlobalContrastiveLoss",
    "KernelMMDLoss",
    "LanguageModelLoss",
    "LogitKDLoss",
    "MarginalDiceCELoss",
    "SpatialAffinityLoss",
    "TaskBCEDiceLoss",
    "TokenAlignmentLoss",
]
