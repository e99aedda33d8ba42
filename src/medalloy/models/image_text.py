"""What a trained image-text model (:class:`~medalloy.models.hybridmed.HybridMED`) answers, in batches
and without gradients: text embeddings, image-text cosine similarities, zero-shot class probabilities
and generated impressions. Reading images is the caller's (see ``engine/radiograph_encoding.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


@torch.inference_mode()
def encode_texts(model: torch.nn.Module, tok: Any, texts: Sequence[str], max_len: int, batch: int = 64) -> torch.Tensor:
    """Global text embeddings ``(N, E)``; ``tok.encode(texts, max_len)`` gives ``(ids, mask)``."""
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(texts), batch):
        ids, mask = tok.encode(list(texts[s : s + batch]), max_len)
        out.append(model.text_features(ids.to(device), mask.to(device))[0].float().cpu())
    return torch.cat(out)


def similarity(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``(N images, M texts)``."""
    return F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).t()


def zero_shot_probs(image_emb: torch.Tensor, class_emb: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Class probabilities ``(N, K)``: softmax over the prompts' cosine similarities / temperature."""
    return torch.softmax(similarity(image_emb, class_emb) / temperature, dim=1)


@torch.inference_mode()
def generate_impressions(model: torch.nn.Module, dec_tok: Any, patches: torch.Tensor, batch: int = 32) -> list[str]:
    """One impression a radiograph, greedy decoding of the captioning branch from its patch tokens
    ``(N, P, width)``; ``dec_tok`` gives the begin/end ids and decodes a row of ids."""
    device = next(model.parameters()).device
    out = []
    for s in range(0, patches.shape[0], batch):
        ids = model.decoder.generate(patches[s : s + batch].to(device), None, "caption", dec_tok.bos_id, dec_tok.eos_id)
        out.extend(dec_tok.decode(row) for row in ids.cpu())
    return out
