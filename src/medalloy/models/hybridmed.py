"""HybridMED's network: an X-ray encoder, a report text encoder and a two-branch generation decoder.

Image ``(B, 1, S, S)`` -> the U-Net encoder (:class:`~medalloy.models.image_encoder.UNetEncoder`)
-> *patch tokens*: the last ``token_stages`` stages (e.g. stride 16 and the bottleneck), each
projected to ``width`` and flattened, ``(B, P, width)``; *global embedding*: the bottleneck
averaged over space, projected to ``embed_dim``.
Text ``(B, T)`` -> the text encoder -> word states ``(B, T, text width)``; *text embedding*: their
masked mean projected to ``embed_dim``; *word tokens*: the states projected to ``width``.
Impression tokens are generated from the patch tokens (captioning branch) or from the findings'
word states projected to ``width`` (summarization branch) by one
:class:`~medalloy.models.report_decoder.ReportDecoder`.
"""

from __future__ import annotations

import torch
from torch import nn

from medalloy.models.image_encoder import UNetEncoder
from medalloy.models.report_decoder import ReportDecoder
from medalloy.models.unet import UNetLayout


class HybridMED(nn.Module):
    """``network``, ``in_channels``, ``out_channels``: the 2D U-Net whose encoder reads the images (see
    :class:`~medalloy.models.image_encoder.UNetEncoder`)."""

    def __init__(
        self,
        network: UNetLayout,
        in_channels: int,
        out_channels: int,
        text_encoder: nn.Module,
        vocab_size: int,
        width: int = 256,
        embed_dim: int = 128,
        decoder_layers: int = 3,
        heads: int = 4,
        max_impression_len: int = 32,
        token_stages: int = 2,
        dropout: float = 0.1,
    ):
        super().__init__()
        if len(network.strides[0]) != 2:
            raise ValueError("HybridMED encodes 2D radiographs: give a 2D plan")
        self.image = UNetEncoder(network, in_channels, out_channels)
        filters = list(network.filters)
        token_stages = max(1, min(token_stages, len(filters)))
        self.token_channels = filters[-token_stages:]
        self.patch_proj = nn.ModuleList(nn.Linear(c, width) for c in self.token_channels)
        self.patch_norm = nn.LayerNorm(width)
        self.image_global = nn.Linear(filters[-1], embed_dim)
        self.text = text_encoder
        tw = text_encoder.width
        self.text_global = nn.Linear(tw, embed_dim)
        self.word_proj = nn.Linear(tw, width)
        self.findings_memory = nn.Linear(tw, width)
        self.decoder = ReportDecoder(vocab_size, width, decoder_layers, heads, max_impression_len, dropout)

    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(global (B, embed_dim), patches (B, P, width))``."""
        feats = self.image(images)
        tokens = [proj(f.flatten(2).transpose(1, 2)) for proj, f in zip(self.patch_proj, feats[-len(self.patch_proj) :])]
        return self.image_global(feats[-1].mean(dim=(2, 3))), self.patch_norm(torch.cat(tokens, 1))

    def text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(global (B, embed_dim), states (B, T, text width))``."""
        states, pooled = self.text(ids, mask)
        return self.text_global(pooled), states

    def words(self, states: torch.Tensor) -> torch.Tensor:
        """Word tokens for token-level alignment, ``(B, T, width)``."""
        return self.word_proj(states)

    def summarize(self, findings_states: torch.Tensor, findings_mask: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summarization branch: impression ``tokens (B, L)`` given the findings' states."""
        return self.decoder(tokens, self.findings_memory(findings_states), findings_mask, "summary")

    def caption(self, patches: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Captioning branch: impression ``tokens (B, L)`` given the image's patch tokens."""
        return self.decoder(tokens, patches, None, "caption")

    def forward(
        self,
        images: torch.Tensor | None = None,
        findings: torch.Tensor | None = None,
        findings_mask: torch.Tensor | None = None,
        impression: torch.Tensor | None = None,
        impression_enc: torch.Tensor | None = None,
        impression_enc_mask: torch.Tensor | None = None,
        parts: tuple[str, ...] = ("global", "token", "summary", "caption"),
    ) -> dict[str, torch.Tensor]:
        """What the chosen ``parts`` need, in one call (so DDP sees one forward):

        - ``global``: ``image_global``, ``impression_global`` (the impression as the text encoder's ids ``impression_enc``);
        - ``token``: ``patches``, ``words`` (of the findings);
        - ``summary`` / ``caption``: ``{summary,caption}_logits`` and ``_hidden`` for the decoder
          ids ``impression`` (teacher forcing: inputs ``impression[:, :-1]``, predicting ``impression[:, 1:]``).
        """
        out: dict[str, torch.Tensor] = {}
        if images is not None:
            out["image_global"], out["patches"] = self.image_features(images)
        if findings is not None and ("token" in parts or "summary" in parts):
            _, states = self.text_features(findings, findings_mask)
            if "token" in parts:
                out["words"] = self.words(states)
            if "summary" in parts:
                out["summary_logits"], out["summary_hidden"] = self.summarize(states, findings_mask, impression[:, :-1])
        if "global" in parts and impression_enc is not None:
            out["impression_global"] = self.text_features(impression_enc, impression_enc_mask)[0]
        if "caption" in parts and images is not None:
            out["caption_logits"], out["caption_hidden"] = self.caption(out["patches"], impression[:, :-1])
        return out
