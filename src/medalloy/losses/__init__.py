"""Losses, one concept a module, each with its formula in the docstring."""

from medalloy.losses.dice_ce import DiceCELoss

__all__ = ["DiceCELoss"]
