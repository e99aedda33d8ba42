"""The generation decoder of HybridMED: one transformer decoder, two branches.

Captioning (image -> impression) and summarization (findings -> impression) share the token
embedding, every self-attention and feed-forward layer, the final norm and the output projection
(tied to the embedding); each branch has only its own cross-attention (and that attention's norm),
so a second branch costs ``layers * (4 width^2 + 2 width)`` parameters, not a second decoder.
Tokens ``(B, T)`` with a memory ``(B, M, width)`` -> logits ``(B, T, vocab)`` and the last hidden
states ``(B, T, width)`` (what distillation compares).
"""

from __future__ import annotations

import torch
from torch import nn

BRANCHES = ("caption", "summary")


class SharedBranchLayer(nn.Module):
    """Pre-norm: causal self-attention (shared), cross-attention (per branch), feed-forward (shared)."""

    def __init__(self, width: int, heads: int, dropout: float, branches: tuple[str, ...] = BRANCHES):
        super().__init__()
        self.self_norm = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.cross_norm = nn.ModuleDict({b: nn.LayerNorm(width) for b in branches})
        self.cross_attn = nn.ModuleDict({b: nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True) for b in branches})
        self.ffn_norm = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_pad: torch.Tensor | None, branch: str, causal: torch.Tensor) -> torch.Tensor:
        h = self.self_norm(x)
        x = x + self.drop(self.self_attn(h, h, h, attn_mask=causal, need_weights=False)[0])
        h = self.cross_norm[branch](x)
        x = x + self.drop(self.cross_attn[branch](h, memory, memory, key_padding_mask=memory_pad, need_weights=False)[0])
        return x + self.drop(self.ffn(self.ffn_norm(x)))


class ReportDecoder(nn.Module):
    """Autoregressive decoder over a report vocabulary; ``branch`` picks the cross-attention."""

    def __init__(self, vocab_size: int, width: int = 256, layers: int = 3, heads: int = 4, max_len: int = 64, dropout: float = 0.1):
        super().__init__()
        self.width, self.max_len = width, max_len
        self.embed = nn.Embedding(vocab_size, width, padding_idx=0)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.pos = nn.Parameter(torch.zeros(max_len, width))
        nn.init.normal_(self.pos, std=0.02)
        self.layers = nn.ModuleList(SharedBranchLayer(width, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None, branch: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens (B, T)`` (starting with the begin token), ``memory (B, M, width)``, ``memory_mask
        (B, M)`` True on real entries (None: all real) -> ``(logits (B, T, V), hidden (B, T, width))``;
        position ``t`` sees tokens ``<= t`` only."""
        if branch not in BRANCHES:
            raise ValueError(f"unknown branch {branch!r}; choose from {BRANCHES}")
        t = tokens.shape[1]
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=tokens.device), diagonal=1)
        x = self.embed(tokens) + self.pos[:t]
        pad = None if memory_mask is None else ~memory_mask
        for layer in self.layers:
            x = layer(x, memory, pad, branch, causal)
        hidden = self.norm(x)
        return hidden @ self.embed.weight.t(), hidden

    @torch.no_grad()
    def generate(
        self, memory: torch.Tensor, memory_mask: torch.Tensor | None, branch: str, bos_id: int, eos_id: int, max_len: int | None = None
    ) -> torch.Tensor:
        """Greedy decoding -> ``(B, L)`` token ids after the begin token, padded with 0 after each end token."""
        max_len = min(max_len or self.max_len, self.max_len)
        b = memory.shape[0]
        seq = torch.full((b, 1), bos_id, dtype=torch.long, device=memory.device)
        done = torch.zeros(b, dtype=torch.bool, device=memory.device)
        for _ in range(max_len - 1):
            logits, _ = self(seq, memory, memory_mask, branch)
            nxt = logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.zeros_like(nxt), nxt)
            seq = torch.cat([seq, nxt[:, None]], 1)
            done |= nxt == eos_id
            if bool(done.all()):
                break
        return seq[:, 1:]
