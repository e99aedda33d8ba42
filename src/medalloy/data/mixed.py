"""Mixed-dataset batches for a universal model: every sample comes from its own dataset, with
the binary targets of the tasks that dataset labels (partial labels) and its modality.

``MixedSampler(step, dist)`` returns::

    image       (B, C, *patch)  float   grey datasets repeated to the C channels of the widest one
    target      (B, T, *patch)  float   target[b, j] = (label == value of the j-th task of b's dataset)
    task_ids    (B, T)          long    global task ids; unused slots hold ``null_task``
    task_weight (B, T)          float   1 for a labelled task, 0 for a padded slot
    modality    (B,)            long    global modality id of each sample's dataset
    dataset     (B,)            long    index of each sample's source (for logging)

Sample ``i`` of step ``t`` draws its dataset, case, location and augmentation from one generator
seeded by ``(seed, t, rank, i)``: batches are a pure function of the step, as for experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medalloy.data.sampling import PatchSampler, RankInfo
from medalloy.seeding import step_rng


@dataclass
class MixedSource:
    """One dataset of a mix: its patch sampler (batch size unused), tasks and modality."""

    name: str
    sampler: PatchSampler
    task_ids: list[int]  # global ids of the tasks this dataset labels
    label_values: list[int]  # the label value of each of those tasks in this dataset's label maps
    modality: int
    weight: float = 1.0


def dataset_weights(sizes: Sequence[int], scheme: str = "sqrt") -> np.ndarray:
    """Sampling probability per dataset from its training-case count: ``uniform`` (each dataset
    alike), ``size`` (each case alike) or ``sqrt`` (between the two: small datasets are seen more
    often than their size alone would give, large ones still more than small ones)."""
    n = np.asarray(sizes, dtype=float)
    if (n <= 0).any():
        raise ValueError("every dataset needs at least one training case")
    w = {"uniform": np.ones_like(n), "size": n, "sqrt": np.sqrt(n)}.get(scheme)
    if w is None:
        raise ValueError(f"unknown dataset weighting {scheme!r}: use uniform, size or sqrt")
    return w / w.sum()


class MixedSampler:
    """Batches mixing several datasets (see the module docstring)."""

    def __init__(
        self,
        sources: Sequence[MixedSource],
        batch_size: int,
        channels: int,
        null_task: int,
        seed: int = 0,
        foreground_oversample: float = 0.33,
    ):
        if not sources:
            raise ValueError("no datasets to mix")
        for s in sources:
            if len(s.task_ids) != len(s.label_values):
                raise ValueError(f"{s.name}: one label value per task needed")
        self.sources = list(sources)
        self.batch_size = batch_size
        self.channels = channels
        self.null_task = null_task
        self.seed = seed
        self.fg = foreground_oversample
        self.slots = max(len(s.task_ids) for s in self.sources)
        w = np.asarray([s.weight for s in self.sources], dtype=float)
        self.p = w / w.sum()

    def sample(self, step: int, rank: int = 0) -> dict[str, torch.Tensor]:
        images, targets, ids, weights, modality, which = [], [], [], [], [], []
        n_fg = int(round(self.batch_size * self.fg))
        for i in range(self.batch_size):
            rng = step_rng(self.seed, step, rank, i)
            k = int(rng.choice(len(self.sources), p=self.p))
            src = self.sources[k]
            img, lab = src.sampler.sample_one(rng, force_fg=i >= self.batch_size - n_fg)
            if img.shape[0] != self.channels:
                if img.shape[0] != 1:
                    raise ValueError(f"{src.name}: {img.shape[0]} channels cannot be widened to {self.channels}")
                img = img.expand(self.channels, *img.shape[1:])
            t = len(src.task_ids)
            target = torch.zeros((self.slots, *lab.shape[1:]))
            target[:t] = torch.stack([(lab[0] == v).float() for v in src.label_values])
            images.append(img)
            targets.append(target)
            ids.append(src.task_ids + [self.null_task] * (self.slots - t))
            weights.append([1.0] * t + [0.0] * (self.slots - t))
            modality.append(src.modality)
            which.append(k)
        return {
            "image": torch.stack(images).contiguous(),
            "target": torch.stack(targets),
            "task_ids": torch.tensor(ids, dtype=torch.long),
            "task_weight": torch.tensor(weights),
            "modality": torch.tensor(modality, dtype=torch.long),
            "dataset": torch.tensor(which, dtype=torch.long),
        }

    def __call__(self, step: int, dist: RankInfo | None = None) -> dict[str, torch.Tensor]:
        return self.sample(step, 0 if dist is None else dist.rank)
