"""Zero-shot probabilities from embeddings: values a wrong implementation would miss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medalloy.models.image_text import zero_shot_probs


def test_zero_shot_probs_sum_to_one_and_follow_similarity():
    p = zero_shot_probs(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), temperature=0.5)
    assert p.sum().item() == pytest.approx(1.0)
    assert p[0, 0].item() == pytest.approx(np.exp(2) / (np.exp(2) + 1))
