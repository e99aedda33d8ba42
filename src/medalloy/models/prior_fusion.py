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
  layer at every scale (medalloy's choice, docs/research/hermes.md "Size"). ``identity_init``: the
  layer's feature output starts at zero (``Up``, or each block's last feature projections when the
  layer runs at full width), so a fresh layer passes the features through unchanged (ControlNet's
  zero convolution; docs/research/hermes.md "Fusion that starts as the identity"). ``prior_init_std``:
  the prior tables start at N(0, std^2) (0.02: ViT's token init; larger keeps a task's identity
  above what its token reads from the image, though not in what the trained head makes of it:
  docs/research/hermes.md "What the task head learns").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


class CrossAttention(nn.Module):
    """Multi-head softmax attention ``(query (B, Nq, C), kv (B, Nk, C), key_padding (B, Nk) bool | None)
    -> (B, Nq, C)``, the maths and parameter names of ``nn.MultiheadAttention`` (``in_proj_weight``
    (3C, C), ``in_proj_bias``, ``out_proj``), so its checkpoints load. Written out because
    ``nn.MultiheadAttention(batch_first=True)`` transposes to sequence-first inside, and a linear
    layer on that view runs as a copy plus a batched matmul: on CPU ~2x this module's time."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * channels, channels))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * channels))
        self.out_proj = nn.Linear(channels, channels)
        # in nn.MultiheadAttention's order (out_proj drawn first), so a seed gives its initial weights
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, kv: torch.Tensor, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        b, nq, c = query.shape
        w_q, w_kv = self.in_proj_weight.split([c, 2 * c])
        b_q, b_kv = self.in_proj_bias.split([c, 2 * c])
        q = F.linear(query, w_q, b_q).view(b, nq, self.heads, -1).transpose(1, 2)
        k, v = F.linear(kv, w_kv, b_kv).view(b, kv.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        mask = None if key_padding is None else ~key_padding[:, None, None, :]  # True = may attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, Nq, head_dim)
        return self.out_proj(out.transpose(1, 2).reshape(b, nq, c))


class PriorBank(nn.Module):
    """One fusion layer's own task and modality token tables (not shared across scales)."""

    def __init__(self, n_tasks: int, n_modalities: int, channels: int, tokens_per_modality: int = 10, init_std: float = 0.02):
        super().__init__()
        self.n_tasks = n_tasks
        self.task = nn.Parameter(torch.randn(n_tasks + 1, channels) * init_std)
        self.modality = nn.Parameter(torch.randn(n_modalities, tokens_per_modality, channels) * init_std)

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
        self.prior_reads = CrossAttention(channels, heads)
        self.norm_p2 = nn.LayerNorm(channels)
        self.prior_mlp = _Mlp(channels, mlp_ratio)
        self.norm_f2, self.norm_p3 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.feature_reads = CrossAttention(channels, heads)
        self.norm_f3 = nn.LayerNorm(channels)
        self.feature_mlp = _Mlp(channels, mlp_ratio)

    def forward(self, features: torch.Tensor, priors: torch.Tensor, padding: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``padding`` (B, P) bool marks null-task tokens: the features do not read them, so a
        padded task list gives the same features as the list without its padding."""
        shape = features.shape
        f, priors = self.tokens(to_tokens(features), priors, padding)
        return from_tokens(f, shape), priors

    def tokens(self, f: torch.Tensor, priors: torch.Tensor, padding: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The same on features as contiguous tokens ``(B, N, C)``."""
        kv = self.norm_f1(f)
        priors = priors + self.prior_reads(self.norm_p1(priors), kv)
        priors = priors + self.prior_mlp(self.norm_p2(priors))
        p = self.norm_p3(priors)
        f = f + self.feature_reads(self.norm_f2(f), p, padding)
        f = f + self.feature_mlp(self.norm_f3(f))
        return f, priors


def to_tokens(features: torch.Tensor) -> torch.Tensor:
    """``(B, C, *sp)`` -> contiguous ``(B, N, C)``. Contiguous matters: a linear layer on a
    transposed view runs as a batched matmul behind a copy, ~4x slower on CPU than one matmul."""
    return features.flatten(2).transpose(1, 2).contiguous()


def from_tokens(tokens: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``(B, N, C)`` -> contiguous ``(B, C, *sp)`` of ``shape``."""
    return tokens.transpose(1, 2).reshape(shape)


class PriorFusionLayer(nn.Module):
    """A :class:`PriorBank` and ``depth`` fusion blocks at one scale of the backbone, at
    ``min(channels, width)`` channels (see the module docstring)."""

    def __init__(
        self, channels: int, n_tasks: int, n_modalities: int, depth: int = 1, tokens_per_modality: int = 10, width: int | None = None,
        identity_init: bool = False, prior_init_std: float = 0.02,
    ):  # fmt: skip
        super().__init__()
        self.width = channels if width is None else min(channels, width)
        self.bank = PriorBank(n_tasks, n_modalities, self.width, tokens_per_modality, prior_init_std)
        self.blocks = nn.ModuleList(BidirectionalFusion(self.width) for _ in range(depth))
        narrow = self.width < channels
        self.down = nn.Linear(channels, self.width) if narrow else None
        self.up = nn.Linear(self.width, channels) if narrow else None
        if identity_init:
            # zeroed after every layer is drawn, so a seed gives the other weights it gave before. One
            # zero map at the output keeps every inner weight's gradient alive once the map has moved;
            # at full width the residual branches' last maps are that output.
            last = [self.up] if narrow else [m for b in self.blocks for m in (b.feature_reads.out_proj, b.feature_mlp[-1])]
            for m in last:
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, features: torch.Tensor, task_ids: torch.Tensor, modality_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> fused features (B, C, *sp), task tokens (B, T, width), modality tokens (B, M, width)."""
        priors = self.bank.gather(task_ids, modality_ids)
        # null tasks pad the list; modality tokens are never padding (with none, the task list holds a real task)
        padding = torch.cat([task_ids == self.bank.null_task, torch.zeros_like(priors[:, task_ids.shape[1] :, 0], dtype=torch.bool)], dim=1)
        f = to_tokens(features)  # once per layer: every block and projection then works on one matrix
        z = f if self.down is None else self.down(f)
        fused = z
        for block in self.blocks:
            fused, priors = block.tokens(fused, priors, padding)
        f = fused if self.up is None else f + self.up(fused - z)
        t = task_ids.shape[1]
        return from_tokens(f, features.shape), priors[:, :t], priors[:, t:]
