"""Shared test set-up: few threads (tests may run beside other jobs), fixed seeds, shared paths."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(int(os.environ.get("MEDALLOY_TEST_THREADS", "2")))

SHARED_DATA = Path(os.environ.get("MEDALLOY_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(autouse=True)
def _seed():
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA
