"""Patch batches for training: cached cases, foreground oversampling, per-step determinism.

``PatchSampler(step, dist)`` returns ``{"image": (B, C, *patch), "label": (B, 1, *patch)}``. Each
sample's case, location and augmentation come from a generator seeded by ``(seed, step, rank, i)``,
so the batch at a step never depends on what ran before it (resume = same batches).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from medalloy.data.preprocess import PreparedCase
from medalloy.data.transforms import AugmentConfig, training_transforms
from medalloy.seeding import step_rng


class RankInfo(Protocol):
    """What a batch source needs of the process it runs in (``engine.distributed.DistInfo`` is one):
    data stays below the engine, so it names no engine type."""

    rank: int


class PatchSampler:
    """Random patches from in-memory cases; a share ``foreground_oversample`` of each batch is centred
    on a voxel of a random present foreground class (nnU-Net's oversampling)."""

    def __init__(
        self,
        cases: Sequence[PreparedCase],
        patch_size: Sequence[int],
        batch_size: int,
        dim: int,
        seed: int = 0,
        foreground_oversample: float = 0.33,
        augment: AugmentConfig | None = None,
        case_weights: Sequence[float] | None = None,
    ):
        if not cases:
            raise ValueError("no cases to sample from")
        self.cases = list(cases)
        self.patch = [int(p) for p in patch_size]
        self.batch_size = batch_size
        self.dim = dim
        self.seed = seed
        self.fg = foreground_oversample
        self.transforms = training_transforms(dim, augment or AugmentConfig())
        w = np.ones(len(self.cases)) if case_weights is None else np.asarray(case_weights, dtype=float)
        self.weights = w / w.sum()

    def _crop(self, case: PreparedCase, rng: np.random.Generator, force_fg: bool) -> tuple[np.ndarray, np.ndarray]:
        img, lab = case.image, case.label
        # 2D plans keep a slice axis (position 1 of the image); 3D plans do not.
        spatial = img.shape[2:] if self.dim == 2 else img.shape[1:]
        centre = None
        if force_fg and case.fg:
            k = list(case.fg)[rng.integers(len(case.fg))]
            coords = case.fg[k]
            centre = coords[rng.integers(len(coords))]
        if self.dim == 2:
            s = int(centre[0]) if centre is not None else int(rng.integers(img.shape[1]))
            img, lab = img[:, s], lab[s]
            centre = None if centre is None else centre[1:]
        starts = []
        for ax, (size, p) in enumerate(zip(spatial, self.patch)):
            hi = size - p
            if centre is None:
                starts.append(int(rng.integers(hi + 1)))
            else:
                # nnU-Net-like: the voxel lands anywhere in the inner half of the patch.
                jitter = int(rng.integers(-(p // 4), p // 4 + 1))
                starts.append(int(np.clip(int(centre[ax]) - p // 2 + jitter, 0, hi)))
        sl = tuple(slice(a, a + p) for a, p in zip(starts, self.patch))
        return img[(slice(None),) + sl], lab[sl]

    def sample_one(self, rng: np.random.Generator, force_fg: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One augmented ``(image (C, *patch) float, label (1, *patch) long)``, all draws from ``rng``."""
        case = self.cases[int(rng.choice(len(self.cases), p=self.weights))]
        img, lab = self._crop(case, rng, force_fg=force_fg)
        img_t = torch.from_numpy(np.ascontiguousarray(img))
        lab_t = torch.from_numpy(np.ascontiguousarray(lab)).unsqueeze(0).float()
        if self.transforms is not None:
            self.transforms.set_random_state(seed=int(rng.integers(2**31)))
            out = self.transforms({"image": img_t, "label": lab_t})
            # MONAI returns MetaTensors; plain tensors spare the network MetaTensor's per-op overhead.
            img_t = torch.as_tensor(out["image"]).as_subclass(torch.Tensor)
            lab_t = torch.as_tensor(out["label"]).as_subclass(torch.Tensor)
        return img_t.float(), lab_t.round().long()

    def sample(self, step: int, rank: int = 0) -> dict[str, torch.Tensor]:
        images, labels = [], []
        n_fg = int(round(self.batch_size * self.fg))
        for i in range(self.batch_size):
            # the last n_fg samples are forced foreground, as in nnU-Net
            img, lab = self.sample_one(step_rng(self.seed, step, rank, i), force_fg=i >= self.batch_size - n_fg)
            images.append(img)
            labels.append(lab)
        return {"image": torch.stack(images), "label": torch.stack(labels)}

    def __call__(self, step: int, dist: RankInfo | None = None) -> dict[str, torch.Tensor]:
        return self.sample(step, 0 if dist is None else dist.rank)
