"""Checkpoints written by earlier medalloy versions (tests/fixtures/checkpoints/, made by
tests/fixtures/make_checkpoints.py) load through today's loaders and answer as they did when written."""

from __future__ import annotations

import pytest
import torch
from checkpoint_inputs import FIXTURES, METHODS, answer, fixture
from safetensors.torch import load_file


@pytest.mark.parametrize("method", METHODS)
def test_fixture_checkpoint_answers_as_when_written(method, tmp_path):
    expected = load_file(str(FIXTURES / f"{method}.expected.safetensors"))
    got = answer(method, fixture(method, tmp_path))
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert key == "tokens" or value.std() > 0, key  # a network that answers a constant would pin nothing
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{method} {k}: {m}")
