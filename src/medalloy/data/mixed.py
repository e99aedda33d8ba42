"""Batches for a universal model: every sample comes with the binary targets of the tasks its
dataset labels (partial labels) and its dataset's modality. Two ways to draw them:

- *mixed* (``per_dataset=False``): each sample of a step draws its own dataset; every dataset
  shares one patch size (Hermes' mixed-dataset batches);
- *per dataset* (``per_dataset=True``): each step draws one dataset and a batch of that dataset's
  own patch and batch size (``MixedSource.batch_size``), so each dataset keeps the field of view
  of its own plan (whole images where its expert uses them). With ``datasets_per_step=k > 1`` a
  step draws ``k`` distinct datasets and returns a list of ``k`` such batches, one per dataset,
  whose losses one optimizer step averages: the gradient mixes datasets as a mixed batch does, and
  each keeps its own field of view.

``MixedSampler(step, dist)`` returns::

    image       (B, C, *patch)  float   grey datasets repeated to the C channels of the widest one
    target      (B, T, *patch)  float   target[b, j] = (label == value of the j-th task of b's dataset)
    task_ids    (B, T)          long    global task ids; unused slots hold ``null_task``
    task_weight (B, T)          float   1 for a labelled task, 0 for a padded slot
    modality    (B,)            long    global modality id of each sample's dataset
    dataset     (B,)            long    index of each sample's source (for logging)

Sample ``i`` of step ``t`` draws its dataset, case, location and augmentation from one generator
seeded by ``(seed, t, rank, i)`` (per dataset: the step's dataset from ``(seed, t, rank, "dataset")``,
the ``j``-th of several datasets' samples from ``(seed, t, rank, j, i)`` for ``j > 0``):
batches are a pure function of the step, as for experts.

:class:`DatasetSteps` draws the step's dataset the same way for batches that keep each dataset's
label maps as they are (distillation: one network, one set of classes, the teacher's): the drawn
dataset's own :class:`~medalloy.data.sampling.PatchSampler` batch, with its index and the weight its
labels have in the segmentation loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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
    batch_size: int | None = None  # per-dataset batches: this dataset's own (None: the sampler's)


def sample_count(cases: Sequence, dim: int) -> int:
    """What a dataset's size is for weighting: its 2D images for a 2D network (a volume sliced for a
    2D plan counts each slice, as nnU-Net's 2D configuration samples slices), its volumes for a 3D
    one. Cases are prepared cases: ``image`` ``(C, S, H, W)`` for 2D plans."""
    if dim == 2:
        return int(sum(c.image.shape[1] for c in cases))
    return len(cases)


def dataset_weights(sizes: Sequence[int], scheme: str = "sqrt") -> np.ndarray:
    """Sampling probability per dataset from its size (:func:`sample_count`): ``uniform`` (each
    dataset alike), ``size`` (each sample alike) or ``sqrt`` (between the two: small datasets are
    seen more often than their size alone would give, large ones still more than small ones)."""
    n = np.asarray(sizes, dtype=float)
    if (n <= 0).any():
        raise ValueError("every dataset needs at least one training case")
    w = {"uniform": np.ones_like(n), "size": n, "sqrt": np.sqrt(n)}.get(scheme)
    if w is None:
        raise ValueError(f"unknown dataset weighting {scheme!r}: use uniform, size or sqrt")
    return w / w.sum()


def step_dataset(p: np.ndarray, seed: int, step: int, rank: int = 0) -> int:
    """The one dataset a per-dataset step ``step`` of ``rank`` draws, by the probabilities ``p`` (summing
    to 1, as :func:`dataset_weights` gives them), from the generator seeded by ``(seed, step, rank, "dataset")``."""
    return int(step_rng(seed, step, rank, "dataset").choice(len(p), p=p))


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
        per_dataset: bool = False,
        datasets_per_step: int = 1,
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
        self.per_dataset = per_dataset
        if datasets_per_step < 1 or (datasets_per_step > 1 and not per_dataset):
            raise ValueError("datasets_per_step > 1 needs per-dataset batches")
        self.datasets_per_step = min(datasets_per_step, len(self.sources))
        self.slots = max(len(s.task_ids) for s in self.sources)
        w = np.asarray([s.weight for s in self.sources], dtype=float)
        self.p = w / w.sum()

    def sample(self, step: int, rank: int = 0) -> dict[str, Any] | list[dict[str, Any]]:
        if not self.per_dataset:
            return self._batch(step, rank, None, 0)
        if self.datasets_per_step == 1:
            return self._batch(step, rank, step_dataset(self.p, self.seed, step, rank), 0)
        pick = step_rng(self.seed, step, rank, "dataset")
        nonzero = int((self.p > 0).sum())  # numpy cannot draw more distinct items than have weight
        chosen = pick.choice(len(self.sources), size=min(self.datasets_per_step, nonzero), replace=False, p=self.p)
        return [self._batch(step, rank, int(k), j) for j, k in enumerate(sorted(chosen.tolist()))]

    def _batch(self, step: int, rank: int, only: int | None, part: int) -> dict[str, Any]:
        images, targets, ids, weights, modality, which = [], [], [], [], [], []
        size = self.batch_size if only is None else self.sources[only].batch_size or self.batch_size
        n_fg = int(round(size * self.fg))
        for i in range(size):
            rng = step_rng(self.seed, step, rank, i) if part == 0 else step_rng(self.seed, step, rank, part, i)
            k = only if only is not None else int(rng.choice(len(self.sources), p=self.p))
            src = self.sources[k]
            img, lab = src.sampler.sample_one(rng, force_fg=i >= size - n_fg)
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
            "one_dataset": only,  # a plain int (or None when mixed), so a step can read it without a device sync
        }

    def __call__(self, step: int, dist: RankInfo | None = None) -> dict[str, Any] | list[dict[str, Any]]:
        return self.sample(step, 0 if dist is None else dist.rank)


class DatasetSteps:
    """Each step one dataset's batch, label maps as they are: the dataset drawn by :func:`step_dataset`
    (as a :class:`MixedSampler` of per-dataset batches draws it), then its sampler's batch of the step.

    ``DatasetSteps(step, dist)`` returns::

        image       (B, C, *patch)  float   the drawn dataset's patches (its sampler's batch size)
        label       (B, 1, *patch)  long    their label maps, in the dataset's values
        dataset     ()              long    index of the drawn dataset
        seg_weight  ()              float   ``seg_weights`` of that dataset: how much its labels count
                                            (0: a dataset whose labels train nothing, taught otherwise)

    ``weights``: each dataset's probability (summing to 1, e.g. :func:`dataset_weights`).
    """

    def __init__(self, samplers: Sequence[PatchSampler], weights: np.ndarray, seed: int, seg_weights: Sequence[float] | None = None):
        if not samplers or len(weights) != len(samplers):
            raise ValueError("one weight per dataset needed")
        self.samplers, self.p, self.seed = list(samplers), np.asarray(weights, dtype=float), seed
        self.seg_weights = [1.0] * len(self.samplers) if seg_weights is None else [float(w) for w in seg_weights]
        if len(self.seg_weights) != len(self.samplers):
            raise ValueError("one segmentation weight per dataset needed")

    def sample(self, step: int, rank: int = 0) -> dict[str, torch.Tensor]:
        d = step_dataset(self.p, self.seed, step, rank)
        batch = self.samplers[d].sample(step, rank)
        return {**batch, "dataset": torch.tensor(d), "seg_weight": torch.tensor(self.seg_weights[d])}

    def __call__(self, step: int, dist: RankInfo | None = None) -> dict[str, torch.Tensor]:
        return self.sample(step, 0 if dist is None else dist.rank)
