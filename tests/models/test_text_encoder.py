"""Text encoders: the scratch transformer's masking, and the packaged MiniLM (when installed) loaded
with its real weights (checked by sha256) and its lower layers frozen."""

from __future__ import annotations

import pytest
import torch

from medalloy.errors import MedalloyError
from medalloy.models import text_encoder as te
from medalloy.models.text_encoder import ScratchTextEncoder, masked_mean


def test_scratch_encoder_ignores_padding():
    enc = ScratchTextEncoder(vocab_size=30, width=16, layers=2, heads=2, max_len=10, dropout=0.0).eval()
    ids = torch.randint(4, 30, (2, 6))
    mask = torch.ones_like(ids, dtype=torch.bool)
    states, pooled = enc(ids, mask)
    padded = torch.cat([ids, torch.zeros(2, 4, dtype=torch.long)], 1)
    pmask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], 1)
    states2, pooled2 = enc(padded, pmask)
    assert torch.allclose(states, states2[:, :6], atol=1e-5) and torch.allclose(pooled, pooled2, atol=1e-5)
    assert torch.allclose(masked_mean(states, mask), states.mean(1), atol=1e-6)


def test_minilm_needs_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == te.MINILM_PACKAGE else real(name, *a))
    with pytest.raises(MedalloyError, match=r"medalloy\[text\]"):
        te.minilm_dir()


def test_minilm_weights_checked_loaded_and_partly_frozen(monkeypatch):
    pytest.importorskip(te.MINILM_PACKAGE)
    pytest.importorskip("transformers")
    from medalloy.data.tokenizer import minilm_tokenizer

    enc = te.MiniLMTextEncoder(trainable_layers=2).eval()
    tok = minilm_tokenizer(te.minilm_dir())
    texts = ["Small left pleural effusion.", "Fluid collecting in the left pleural space.", "The heart is markedly enlarged."]
    ids, mask = tok.encode(texts, 24)
    with torch.no_grad():
        states, pooled = enc(ids, mask)
    assert states.shape == (3, 24, 384) and pooled.shape == (3, 384)
    sims = torch.nn.functional.normalize(pooled, dim=-1) @ torch.nn.functional.normalize(pooled, dim=-1).t()
    assert sims[0, 1] > sims[0, 2] + 0.1  # the real sentence model: paraphrases closer than other findings
    frozen = [n for n, p in enc.named_parameters() if not p.requires_grad]
    assert any("embeddings" in n for n in frozen) and any("layer.0." in n for n in frozen)
    assert all(p.requires_grad for n, p in enc.named_parameters() if "layer.5." in n)
    monkeypatch.setattr(te, "MINILM_SHA256", "0" * 64)
    with pytest.raises(MedalloyError, match="sha256"):
        te.MiniLMTextEncoder()
