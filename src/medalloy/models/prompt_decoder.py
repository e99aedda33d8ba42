"""Prompt-driven mask decoder (SAM-style, as KA2ER's "prompt features and a mask decoder").

Each task has a learned prompt embedding. A task's two tokens (its prompt and a learned output
token) attend to the image tokens through a small two-way transformer (SAM's ``TwoWayTransformer``
layout, depth 2): token self-attention, tokens -> image, MLP, image -> tokens; then a last tokens ->
image attention. The output token, through a hypernetwork MLP, becomes a 1x1 kernel on the finest
decoder features, plus a per-task bias::

    image tokens   I  (B, N, D)       amalgamated deepest features (with their positional encoding)
    features       Z  (B, C, *sp)     the finest decoder features
    task_ids          (B, T)
    per task t: [p_t, o] -(two-way x depth, final attn)-> o_t (D) ; w_t = MLP(o_t) (C)
    logits[b, t] = <w_bt, Z_b> + bias_t   (B, T, *sp)

Tasks are decoded independently (batched as ``B*T`` sequences), so a task's mask never depends on
which other tasks are asked with it. ``PlainTaskHead`` is the benchmark's "no prompt decoder"
ablation: one 1x1 kernel and bias per task.
"""

from __future__ import annotations

import torch
from torch import nn


class TwoWayBlock(nn.Module):
    """Tokens (M, S, D) and image tokens (M, N, D) attend to each other; both are returned."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.to_image = nn.MultiheadAttention(width, heads, batch_first=True)
        self.to_tokens = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(4))

    def forward(self, t: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.norms[0](t + self.self_attn(t, t, t, need_weights=False)[0])
        t = self.norms[1](t + self.to_image(t, img, img, need_weights=False)[0])
        t = self.norms[2](t + self.mlp(t))
        img = self.norms[3](img + self.to_tokens(img, t, t, need_weights=False)[0])
        return t, img


def _task_offset(bias: nn.Embedding, task_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    b = bias(task_ids).to(logits.dtype)  # (B, T, 1)
    return logits + b.view(*b.shape[:2], *([1] * (logits.ndim - 2)))


class PromptMaskDecoder(nn.Module):
    """``(image_tokens (B, N, D), features (B, C, *sp), task_ids (B, T)) -> logits (B, T, *sp)``."""

    def __init__(self, n_tasks: int, width: int, feature_channels: int, depth: int = 2, heads: int = 4, prior_logit: float = 0.0):
        super().__init__()
        self.prompts = nn.Embedding(n_tasks + 1, width)  # + the null task that pads task lists
        nn.init.normal_(self.prompts.weight, std=0.02)
        self.output_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.blocks = nn.ModuleList(TwoWayBlock(width, heads) for _ in range(depth))
        self.final = nn.MultiheadAttention(width, heads, batch_first=True)
        self.final_norm = nn.LayerNorm(width)
        self.hyper = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, feature_channels))
        self.bias = nn.Embedding(n_tasks + 1, 1)
        nn.init.constant_(self.bias.weight, prior_logit)

    def forward(self, image_tokens: torch.Tensor, features: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        b, t = task_ids.shape
        n, d = image_tokens.shape[1:]
        prompts = self.prompts(task_ids).reshape(b * t, 1, d).to(image_tokens.dtype)
        toks = torch.cat([prompts, self.output_token.to(image_tokens.dtype).expand(b * t, 1, d)], dim=1)  # (B*T, 2, D)
        img = image_tokens[:, None].expand(b, t, n, d).reshape(b * t, n, d)
        for block in self.blocks:
            toks, img = block(toks, img)
        out = self.final_norm(toks + self.final(toks, img, img, need_weights=False)[0])[:, 1]  # the output token
        kernels = self.hyper(out).reshape(b, t, -1)  # (B, T, C)
        logits = torch.einsum("bc...,btc->bt...", features, kernels.to(features.dtype))
        return _task_offset(self.bias, task_ids, logits)


class PlainTaskHead(nn.Module):
    """``(features (B, C, *sp), task_ids (B, T)) -> logits (B, T, *sp)``: a 1x1 kernel and bias per task."""

    def __init__(self, n_tasks: int, feature_channels: int, prior_logit: float = 0.0):
        super().__init__()
        self.weight = nn.Embedding(n_tasks + 1, feature_channels)
        nn.init.normal_(self.weight.weight, std=feature_channels**-0.5)
        self.bias = nn.Embedding(n_tasks + 1, 1)
        nn.init.constant_(self.bias.weight, prior_logit)

    def forward(self, features: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        logits = torch.einsum("bc...,btc->bt...", features, self.weight(task_ids).to(features.dtype))
        return _task_offset(self.bias, task_ids, logits)
