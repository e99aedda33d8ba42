"""Seeds (a base module every layer may use): one call before building models; per-step generators so data do not depend on history."""

from __future__ import annotations

import random
import zlib

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_seed(*parts: int | str) -> int:
    """A 63-bit seed derived from ``(seed, step, rank, item, ...)``: the batch at a step is a pure
    function of these, which is what makes a resumed run identical to an uninterrupted one."""
    text = "/".join(str(p) for p in parts).encode()
    return (zlib.crc32(text) << 31 | zlib.adler32(text)) & (2**63 - 1)


def step_rng(*parts: int | str) -> np.random.Generator:
    return np.random.default_rng(step_seed(*parts))
