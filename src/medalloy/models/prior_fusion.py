"""Hermes' context-prior fusion: learnable task and modality tokens meet backbone features by
bidirectional attention (Gao et al., CVPR 2024).

Shapes (``P`` = prior tokens of a sample = ``T`` task tokens + ``M`` modality tokens):

- :class:`PriorBank` holds one fusion layer's tables: ``task`` ``(n_tasks + 1, C)`` (the last row
  is the *null* task that pads task lists of different lengths) and ``modality``
  ``(n_modalities, tokens_per_modality, C)`` (``tokens_per_modality=0``: task priors only);
  ``gather(task_ids (B, T), modality_ids (B,))`` -> ``(B, T + M, C)``.
- :class:`BidirectionalFusion` ``(features (B, C, *sp), priors (B, P, C)) -> (features, priors)``,
  same shapes:

  1. ``priors += CA(LN(priors), LN(f))``; ``priors += MLP(LN(priors))`` (priors read the image);
  2. ``f += CA(LN(f), LN(priors))``; ``f += MLP(LN(f))`` (every position reads the priors but
     the null tokens that pad a task list: they are masked out, so padding is inert),

  where ``CA(q, kv)`` is multi-head softmax attention with head size 32 and the MLP has ratio 4,
  as in the paper's public code.
- :class:`PriorFusionLayer` ``(features (B, C, *sp), task_ids, modality_ids)``: when ``width < C``
  the fusion runs on ``z = Down(f)`` (a per-position linear map C -> width) and returns
  ``f + Up(z' - z)`` (``Up``: width -> C), so its cost and size are those of a ``width``-channel
  layer at every scale (medalloy's choice, docs/methods/hermes.md "Size").
"""

from __future__ import annotations

import torch
from torch import nn

HEAD_DIM = 32


def num_heads(channels: int) -> int:
    """``channels / 32`` heads (the paper's head size), at least one; ``channels`` must divide."""
    heads = max(1, channels // HEAD_DIM)
    while channels % heads:
        heads -= 1
    return heads


class _Mlp(nn.Sequential):
    def __init__(self, channels: int, ratio: int = 4):
        super().__init__(nn.Linear(channels, ratio * channels), nn.GELU(), nn.Linear(ratio * channels, channels))


class PriorBank(nn.Module):
    """One fusion layer's own task and modality token tables (not shared across scales)."""

    def __init__(self, n_tasks: int, n_modalities: int, channels: int, tokens_per_modality: int = 10):
        super().__init__()
        self.n_tasks = n_tasks
        self.task = nn.Parameter(torch.randn(n_tasks + 1, channels) * 0.02)
        self.modality = nn.Parameter(torch.randn(n_modalities, tokens_per_modality, channels) * 0.02)

    @property
    def null_task(self) -> int:
        return self.n_tasks

    def gather(self, task_ids: torch.Tensor, modality_ids: torch.Tensor) -> torch.Tensor:
        """``task_ids`` (B, T) long (``null_task`` pads), ``modality_ids`` (B,) -> (B, T + M, C)."""
        return torch.cat([self.task[task_ids], self.modality[modality_ids]], dim=1)


class BidirectionalFusion(nn.Module):
    """Priors attend to features, then features attend to the updated priors (see module doc)."""

    def __init__(self, channels: int, mlp_ratio: int = 4):
        super().__init__()
        heads = num_heads(channels)
        self.norm_p1, self.norm_f1 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.prior_reads = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.norm_p2 = nn.LayerNorm(channels)
        self.prior_mlp = _Mlp(channels, mlp_ratio)
        self.norm_f2, self.norm_p3 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.feature_reads = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.norm_f3 = nn.LayerNorm(channels)
        self.feature_mlp = _Mlp(channels, mlp_ratio)

    def forward(self, features: torch.Tensor, priors: torch.Tensor, padding: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``padding`` (B, P) bool marks null-task tokens: the features do not read them, so a
        padded task list gives the same features as the list without its padding."""
        shape = features.shape
        f = features.flatten(2).transpose(1, 2)  # (B, N, C)
        kv = self.norm_f1(f)
        priors = priors + self.prior_reads(self.norm_p1(priors), kv, kv, need_weights=False)[0]
        priors = priors + self.prior_mlp(self.norm_p2(priors))
        p = self.norm_p3(priors)
        f = f + self.feature_reads(self.norm_f2(f), p, p, key_padding_mask=padding, need_weights=False)[0]
        f = f + self.feature_mlp(self.norm_f3(f))
        return f.transpose(1, 2).reshape(shape), priors


class _ChannelLinear(nn.Linear):
    """A linear map over the channel axis of ``(B, C, *sp)`` (a 1x1 convolution of any dimension)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class PriorFusionLayer(nn.Module):
    """A :class:`PriorBank` and ``depth`` fusion blocks at one scale of the backbone, at
    ``min(channels, width)`` channels (see the module docstring)."""

    def __init__(self, channels: int, n_tasks: int, n_modalities: int, depth: int = 1, tokens_per_modality: int = 10, width: int | None = None):
        super().__init__()
        self.width = channels if width is None else min(channels, width)
        self.bank = PriorBank(n_tasks, n_modalities, self.width, tokens_per_modality)
        self.blocks = nn.ModuleList(BidirectionalFusion(self.width) for _ in range(depth))
        narrow = self.width < channels
        self.down = _ChannelLinear(channels, self.width) if narrow else None
        self.up = _ChannelLinear(self.width, channels) if narrow else None

    def forward(self, features: torch.Tensor, task_ids: torch.Tensor, modality_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> fused features (B, C, *sp), task tokens (B, T, width), modality tokens (B, M, width)."""
        priors = self.bank.gather(task_ids, modality_ids)
        # null tasks pad the list; modality tokens are never padding (with none, the task list holds a real task)
        padding = torch.cat([task_ids == self.bank.null_task, torch.zeros_like(priors[:, task_ids.shape[1] :, 0], dtype=torch.bool)], dim=1)
        z = features if self.down is None else self.down(features)
        fused = z
        for block in self.blocks:
            fused, priors = block(fused, priors, padding)
        if self.up is not None:
            features = features + self.up(fused - z)
        else:
            features = fused
        t = task_ids.shape[1]
        return features, priors[:, :t], priors[:, t:]
