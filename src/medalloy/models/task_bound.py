"""A task-conditioned network (Hermes, amalgamated) asked for fixed tasks: a plain ``x -> logits`` model."""

from __future__ import annotations

import torch
from torch import nn


class TaskBound(nn.Module):
    """``net(x, task_ids (B, T), modality_ids (B,)) -> {"logits": (B, T, *sp), ...}`` asked for fixed
    tasks of one modality: ``x -> logits (B, T, *sp)``, so the plain
    :class:`~medalloy.engine.inference.Predictor` (sliding window, TTA) can run it. One-channel input
    is repeated to ``in_channels`` (grey images in a model that also saw RGB)."""

    def __init__(self, net: nn.Module, task_ids: list[int], modality_id: int, in_channels: int | None = None):
        super().__init__()
        self.net = net
        self.in_channels = in_channels
        self.register_buffer("task_ids", torch.tensor([task_ids], dtype=torch.long), persistent=False)
        self.register_buffer("modality_id", torch.tensor([modality_id], dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels and x.shape[1] == 1 and self.in_channels > 1:
            x = x.expand(-1, self.in_channels, *x.shape[2:])
        b = x.shape[0]
        return self.net(x, self.task_ids.expand(b, -1), self.modality_id.expand(b))["logits"]
