"""Zero-shot probabilities from embeddings: values a wrong implementation would miss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medalloy.models.image_text import encode_texts, generate_impressions, similarity, zero_shot_probs


def test_zero_shot_probs_sum_to_one_and_follow_similarity():
    p = zero_shot_probs(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), temperature=0.5)
    assert p.sum().item() == pytest.approx(1.0)
    assert p[0, 0].item() == pytest.approx(np.exp(2) / (np.exp(2) + 1))


def test_similarity_is_cosine_whatever_the_lengths():
    s = similarity(torch.tensor([[3.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 5.0], [2.0, 2.0]]))
    assert torch.allclose(s, torch.tensor([[0.0, 2**-0.5], [2**-0.5, 1.0]]))  # rows normalised, not columns


def test_zero_shot_defaults_to_clips_temperature():
    img, cls = torch.tensor([[1.0, 0.2]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(zero_shot_probs(img, cls), zero_shot_probs(img, cls, temperature=0.07))
    assert not torch.allclose(zero_shot_probs(img, cls), zero_shot_probs(img, cls, temperature=1.07))


class _Tok:
    """Encodes each text as its length (ids) and a mask of ones; decodes ids as their sum."""

    bos_id, eos_id = 1, 2

    def __init__(self):
        self.calls = []

    def encode(self, texts, max_len):
        self.calls.append((list(texts), max_len))
        return torch.tensor([[len(t)] for t in texts], dtype=torch.float32), torch.ones(len(texts), 1)

    def decode(self, row):
        return str(int(row.sum()))


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.decoder = self
        self.seen = []

    def text_features(self, ids, mask):
        return (ids * mask * self.w).to(torch.float64), None

    def generate(self, patches, memory, branch, bos, eos):
        self.seen.append((patches.shape[0], memory, branch, bos, eos))
        return patches.sum(dim=(1, 2)).long()[:, None]


def test_texts_are_encoded_in_batches_in_order_as_float():
    tok = _Tok()
    emb = encode_texts(_Model(), tok, ["a", "bb", "ccc", "dddd", "eeeee"], max_len=7, batch=2)
    assert emb.dtype == torch.float32 and emb[:, 0].tolist() == [1, 2, 3, 4, 5]
    assert [c[0] for c in tok.calls] == [["a", "bb"], ["ccc", "dddd"], ["eeeee"]] and {c[1] for c in tok.calls} == {7}


def test_impressions_are_generated_in_batches_in_order_from_the_caption_branch():
    model = _Model()
    patches = torch.arange(5, dtype=torch.float32).reshape(5, 1, 1)
    assert generate_impressions(model, _Tok(), patches, batch=2) == ["0", "1", "2", "3", "4"]
    assert model.seen == [(2, None, "caption", 1, 2), (2, None, "caption", 1, 2), (1, None, "caption", 1, 2)]
