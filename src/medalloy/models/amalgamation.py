"""KA2ER's adaptive amalgamation layer (Gao et al. 2024): frozen experts' hidden features merged
into the foundation's by hierarchical attention (docs/methods/amalgamation.md).

At one stage of the foundation, with ``N`` positions, ``K`` experts and width ``D``::

    f   (B, Cf, *g)  foundation features          -> Pf (1x1 conv) + positional conv -> tokens F (B, N, D)
    e_k (B, Ck, *gk) expert k's features, resized to g -> Pk (1x1 conv) + expert embedding -> E_k (B, N, D)
    (1) F  = F + SelfAttn(LN F) ; F = F + MLP(LN F)                      over the foundation's tokens
    (2) H_k = F + CrossAttn(LN F -> LN E_k)                              what expert k adds, per position
    (3) a = softmax_k(<W_q (LN F + c), W_k LN [F, H_1..H_K]> / sqrt(D))  per position, over K + 1 slots
        A = sum_k a_k H_k  (slot 0: F itself, "no expert")               input- (and, with c, task-) adaptive
    out = f + Po(A)        (B, Cf, *g)    Po a zero-initialised 1x1 conv: training starts from the foundation

The layer returns ``(out, A (B, N, D), [E_k (B, N, D)])``: the merged and the projected expert
tokens are what feature distillation compares (FeatureTap reads ``out``).

``c`` (B, D) is an optional condition: the mean prompt embedding of the tasks asked (task-adaptive
weighting). ``hierarchical=False`` is the benchmark's ablation: ``out = f + Po(conv1x1([Pf f, E_1..E_K]))``.
``weights`` (B, N, K + 1) of the last call are kept on ``last_weights`` for inspection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv1x1(dim: int, c_in: int, c_out: int) -> nn.Module:
    return (nn.Conv2d if dim == 2 else nn.Conv3d)(c_in, c_out, 1)


def resize_to(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Features to a grid: area-averaged when finer, linearly interpolated when coarser."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    if all(s >= t for s, t in zip(x.shape[2:], size)):
        return F.adaptive_avg_pool2d(x, size) if x.ndim == 4 else F.adaptive_avg_pool3d(x, size)
    return F.interpolate(x, size=size, mode="bilinear" if x.ndim == 4 else "trilinear", align_corners=False)


def tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, D, *g) -> (B, N, D)."""
    return x.flatten(2).transpose(1, 2)


class AmalgamationLayer(nn.Module):
    """``(f (B, Cf, *g), experts [(B, Ck, *gk)], condition (B, D) | None) -> (out (B, Cf, *g), A, [E_k])``."""

    def __init__(self, dim: int, foundation_channels: int, expert_channels: list[int], width: int = 64, heads: int = 4, hierarchical: bool = True):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.width, self.hierarchical, self.n_experts = width, hierarchical, len(expert_channels)
        self.proj_f = conv1x1(dim, foundation_channels, width)
        # a depthwise conv as positional encoding (CPVT): any grid size, no table to interpolate
        self.pos = (nn.Conv2d if dim == 2 else nn.Conv3d)(width, width, 3, padding=1, groups=width)
        self.proj_e = nn.ModuleList(conv1x1(dim, c, width) for c in expert_channels)
        self.expert_embed = nn.Parameter(torch.zeros(max(1, len(expert_channels)), width))
        nn.init.normal_(self.expert_embed, std=0.02)
        if hierarchical:
            self.norm_self, self.self_attn = nn.LayerNorm(width), nn.MultiheadAttention(width, heads, batch_first=True)
            self.norm_mlp = nn.LayerNorm(width)
            self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
            self.norm_q, self.norm_kv = nn.LayerNorm(width), nn.LayerNorm(width)
            self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
            self.norm_slots = nn.LayerNorm(width)
            self.gate_q, self.gate_k = nn.Linear(width, width), nn.Linear(width, width)
        else:
            self.mix = conv1x1(dim, width * (1 + len(expert_channels)), width)
        self.proj_out = conv1x1(dim, width, foundation_channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        self.last_weights: torch.Tensor | None = None

    def forward(
        self, f: torch.Tensor, experts: list[torch.Tensor], condition: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        if len(experts) != self.n_experts:
            raise ValueError(f"layer built for {self.n_experts} experts, got {len(experts)}")
        grid = tuple(f.shape[2:])
        pf = self.proj_f(f)
        pf = pf + self.pos(pf)
        projected = [p(resize_to(e.to(pf.dtype), grid)) for p, e in zip(self.proj_e, experts)]
        if not self.hierarchical:
            mixed = self.mix(torch.cat([pf, *projected], dim=1))
            return f + self.proj_out(mixed).to(f.dtype), tokens(mixed), [tokens(e) for e in projected]
        t = tokens(pf)  # (B, N, D)
        q = self.norm_self(t)
        t = t + self.self_attn(q, q, q, need_weights=False)[0]  # (1) foundation self-attention
        t = t + self.mlp(self.norm_mlp(t))
        slots = [t]
        q = self.norm_q(t)
        for k, e in enumerate(projected):  # (2) foundation tokens ask each expert
            kv = self.norm_kv(tokens(e) + self.expert_embed[k])
            slots.append(t + self.cross_attn(q, kv, kv, need_weights=False)[0])
        stacked = torch.stack(slots, dim=2)  # (B, N, K + 1, D)
        query = t if condition is None else t + condition[:, None, :].to(t.dtype)
        score = torch.einsum("bnd,bnkd->bnk", self.gate_q(self.norm_slots(query)), self.gate_k(self.norm_slots(stacked))) / self.width**0.5
        weights = score.float().softmax(-1).to(t.dtype)  # (3) which expert speaks where
        self.last_weights = weights.detach()
        merged = torch.einsum("bnk,bnkd->bnd", weights, stacked)
        out = f + self.proj_out(merged.transpose(1, 2).reshape(f.shape[0], self.width, *grid)).to(f.dtype)
        return out, merged, [tokens(e) for e in projected]
