"""Floating-point operations of one forward pass, counted by PyTorch's own ``FlopCounterMode``
(convolutions, matrix products, attention; a multiply-add counts as two FLOPs), not by hand."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def forward_gflops(model: nn.Module, shape: tuple[int, ...] | list[int]) -> float:
    """GFLOPs of ``model`` on one input of ``shape`` ``(C, *spatial)`` (batch 1, eval mode, fp32)."""
    x = torch.zeros(1, *shape)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 1e9
