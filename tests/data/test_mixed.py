"""MixedSampler: per-task binary targets, padded task slots, channel widening, determinism, weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medalloy.data.io import ImageMeta
from medalloy.data.mixed import MixedSampler, MixedSource, dataset_weights, sample_count
from medalloy.data.preprocess import PreparedCase, foreground_coords
from medalloy.data.sampling import PatchSampler
from medalloy.data.transforms import AugmentConfig

OFF = AugmentConfig(enabled=False)


def _case(case_id: str, channels: int, label: np.ndarray, value: float) -> PreparedCase:
    image = np.full((channels, *label.shape), value, np.float32)
    image[:, :, 0, 0] = np.arange(channels)[:, None]  # tells the channels apart
    fg = foreground_coords(label, int(label.max()) + 1, np.random.default_rng(0))
    return PreparedCase(case_id, image, label, ImageMeta(kind="png", shape=label.shape[1:], spacing=(1.0, 1.0)), fg=fg)


def _sources(weight_b: float = 1.0) -> list[MixedSource]:
    lab_a = np.zeros((1, 8, 8), np.int16)
    lab_a[0, 2:5, 2:5] = 1  # lung
    lab_a[0, 5:7, 5:7] = 2  # heart
    lab_b = np.zeros((1, 8, 8), np.int16)
    lab_b[0, 1:4, 4:7] = 1  # polyp
    a = PatchSampler([_case("a", 1, lab_a, 7.0)], [8, 8], 1, 2, augment=OFF)
    b = PatchSampler([_case("b", 3, lab_b, 9.0)], [8, 8], 1, 2, augment=OFF)
    # A labels lung (task 0) and heart (task 1); B labels polyp (task 2)
    return [
        MixedSource("A", a, task_ids=[0, 1], label_values=[1, 2], modality=0),
        MixedSource("B", b, task_ids=[2], label_values=[1], modality=1, weight=weight_b),
    ]


def test_targets_slots_channels_and_modality_per_sample():
    sampler = MixedSampler(_sources(), batch_size=16, channels=3, null_task=3, seed=0)
    batch = sampler.sample(0)
    assert batch["image"].shape == (16, 3, 8, 8) and batch["target"].shape == (16, 2, 8, 8)
    from_a = batch["dataset"] == 0
    assert 0 < int(from_a.sum()) < 16  # both datasets are drawn
    for i in range(16):
        if from_a[i]:
            assert batch["task_ids"][i].tolist() == [0, 1] and batch["task_weight"][i].tolist() == [1.0, 1.0]
            assert batch["modality"][i] == 0 and batch["image"][i, :, 3, 3].tolist() == [7.0, 7.0, 7.0]
            assert batch["target"][i, 0].sum() == 9 and batch["target"][i, 1].sum() == 4
            assert batch["target"][i, 0, 6, 6] == 0 and batch["target"][i, 1, 6, 6] == 1
        else:
            # one task: the second slot is padding with the null task and weight 0
            assert batch["task_ids"][i].tolist() == [2, 3] and batch["task_weight"][i].tolist() == [1.0, 0.0]
            assert batch["modality"][i] == 1 and batch["image"][i, :, 0, 0].tolist() == [0.0, 1.0, 2.0]
            assert batch["target"][i, 0].sum() == 9 and batch["target"][i, 1].sum() == 0


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def test_batches_are_a_function_of_the_step():
    s1 = MixedSampler(_sources(), batch_size=6, channels=3, null_task=3, seed=4)
    s2 = MixedSampler(_sources(), batch_size=6, channels=3, null_task=3, seed=4)
    later = [s2.sample(k) for k in range(3)][-1]
    first = s1.sample(2)
    assert _same(first, later) and first["one_dataset"] is None  # mixed: no single dataset
    other_seed = MixedSampler(_sources(), batch_size=6, channels=3, null_task=3, seed=5).sample(2)
    assert not torch.equal(first["dataset"], other_seed["dataset"]) or not torch.equal(first["image"], other_seed["image"])


def test_weights_steer_the_mix():
    only_a = MixedSampler(_sources(weight_b=0.0), batch_size=12, channels=3, null_task=3)
    assert (only_a.sample(1)["dataset"] == 0).all()
    np.testing.assert_allclose(dataset_weights([100, 25], "sqrt"), [10 / 15, 5 / 15])
    np.testing.assert_allclose(dataset_weights([100, 25], "size"), [0.8, 0.2])
    np.testing.assert_allclose(dataset_weights([100, 25], "uniform"), [0.5, 0.5])
    with pytest.raises(ValueError, match="weighting"):
        dataset_weights([1], "bogus")


def test_a_sliced_volume_counts_its_slices_for_a_2d_network():
    from types import SimpleNamespace

    volumes = [SimpleNamespace(image=np.zeros((1, s, 8, 8), np.float32)) for s in (9, 7)]
    images = [SimpleNamespace(image=np.zeros((3, 1, 8, 8), np.float32)) for _ in range(4)]
    assert sample_count(volumes, 2) == 16 and sample_count(images, 2) == 4
    assert sample_count([SimpleNamespace(image=np.zeros((1, 9, 8, 8), np.float32))], 3) == 1  # 3D: a volume is one sample


def test_two_channel_source_cannot_be_widened():
    srcs = _sources()
    with pytest.raises(ValueError, match="cannot be widened"):
        MixedSampler(srcs[1:], batch_size=1, channels=4, null_task=3).sample(0)


def test_per_dataset_batches_keep_each_datasets_patch_and_batch_size():
    lab_a = np.zeros((1, 8, 8), np.int16)
    lab_a[0, 2:5, 2:5] = 1
    lab_b = np.zeros((1, 16, 12), np.int16)
    lab_b[0, 4:9, 3:7] = 1
    a = MixedSource("A", PatchSampler([_case("a", 1, lab_a, 7.0)], [8, 8], 1, 2, augment=OFF), [0, 1], [1, 2], 0, weight=3.0, batch_size=5)
    b = MixedSource("B", PatchSampler([_case("b", 3, lab_b, 9.0)], [16, 12], 1, 2, augment=OFF), [2], [1], 1, weight=1.0, batch_size=2)
    sampler = MixedSampler([a, b], batch_size=99, channels=3, null_task=3, seed=0, per_dataset=True)
    seen = []
    for step in range(200):
        batch = sampler.sample(step)
        k = int(batch["dataset"][0])
        assert (batch["dataset"] == k).all()  # one dataset a step
        size, patch = ((5, (8, 8)), (2, (16, 12)))[k]
        assert batch["image"].shape == (size, 3, *patch) and batch["target"].shape == (size, 2, *patch)
        seen.append(k)
    # drawn by weight (3:1): 150 expected of 200; the draws are a fixed function of (seed, step)
    assert 130 <= seen.count(0) <= 170
    again = MixedSampler([a, b], batch_size=99, channels=3, null_task=3, seed=0, per_dataset=True).sample(17)
    assert _same(again, sampler.sample(17))


def test_several_datasets_a_step_give_one_batch_each_at_its_own_patch():
    lab_a = np.zeros((1, 8, 8), np.int16)
    lab_a[0, 2:5, 2:5] = 1
    lab_b = np.zeros((1, 16, 12), np.int16)
    lab_b[0, 4:9, 3:7] = 1
    a = MixedSource("A", PatchSampler([_case("a", 1, lab_a, 7.0)], [8, 8], 1, 2, augment=OFF), [0, 1], [1, 2], 0, batch_size=5)
    b = MixedSource("B", PatchSampler([_case("b", 3, lab_b, 9.0)], [16, 12], 1, 2, augment=OFF), [2], [1], 1, batch_size=2)
    c = MixedSource("C", PatchSampler([_case("c", 1, lab_a, 5.0)], [8, 8], 1, 2, augment=OFF), [3], [1], 0, weight=0.0, batch_size=3)
    sampler = MixedSampler([a, b, c], batch_size=99, channels=3, null_task=4, seed=0, per_dataset=True, datasets_per_step=3)
    for step in range(20):
        parts = sampler.sample(step)
        # C has no weight: never drawn, so each step holds A then B, each at its own patch and batch size
        assert [int(p["dataset"][0]) for p in parts] == [0, 1]
        assert parts[0]["image"].shape == (5, 3, 8, 8) and parts[1]["image"].shape == (2, 3, 16, 12)
        assert torch.equal(parts[0]["image"][:, 0, 4, 4], torch.full((5,), 7.0)) and torch.equal(parts[1]["image"][:, 0, 8, 8], torch.full((2,), 9.0))
    again = MixedSampler([a, b, c], batch_size=99, channels=3, null_task=4, seed=0, per_dataset=True, datasets_per_step=3).sample(7)
    assert all(_same(x, y) for x, y in zip(again, sampler.sample(7)))
    assert all(torch.all(part["dataset"] == part["one_dataset"]) for part in again)  # the plain int names the part's dataset
    # the first dataset's samples are those a one-dataset step would draw for it
    one = MixedSampler([a, b], batch_size=99, channels=3, null_task=4, seed=0, per_dataset=True)
    step = next(t for t in range(50) if int(one.sample(t)["dataset"][0]) == 0)
    two = MixedSampler([a, b], batch_size=99, channels=3, null_task=4, seed=0, per_dataset=True, datasets_per_step=2)
    assert torch.equal(two.sample(step)[0]["image"], one.sample(step)["image"])
    with pytest.raises(ValueError, match="per-dataset"):
        MixedSampler([a, b], batch_size=4, channels=3, null_task=4, datasets_per_step=2)


def test_dataset_steps_give_the_drawn_datasets_own_batch_with_its_index_and_seg_weight():
    from medalloy.data.mixed import DatasetSteps, step_dataset

    srcs = _sources()
    a, b = (PatchSampler(s.sampler.cases, [8, 8], 3, 2, seed=7, augment=OFF) for s in srcs)  # label maps kept as they are
    p = dataset_weights([1, 3], "size")
    steps = DatasetSteps([a, b], p, seed=2, seg_weights=[1.0, 0.0])
    drawn = []
    for step in range(120):
        batch = steps.sample(step)
        d = int(batch["dataset"])
        own = (a, b)[d].sample(step)
        assert torch.equal(batch["image"], own["image"]) and torch.equal(batch["label"], own["label"])
        assert batch["image"].shape == ((3, 1, 8, 8), (3, 3, 8, 8))[d] and float(batch["seg_weight"]) == (1.0, 0.0)[d]
        drawn.append(d)
    # the step's dataset is the one a per-dataset MixedSampler of these weights draws: (seed, step, rank, "dataset")
    mixed = MixedSampler(
        [MixedSource(s.name, s.sampler, s.task_ids, s.label_values, s.modality, w) for s, w in zip(srcs, p)], 1, 3, 3, seed=2, per_dataset=True
    )
    assert drawn == [int(mixed.sample(t)["dataset"][0]) for t in range(120)] == [step_dataset(p, 2, t) for t in range(120)]
    assert 75 <= drawn.count(1) <= 105  # 3:1 by weight: 90 expected
    assert int(steps(5, SimpleRank(1))["dataset"]) == step_dataset(p, 2, 5, rank=1)  # each rank draws its own
    assert [int(DatasetSteps([a], np.ones(1), seed=0)(t)["dataset"]) for t in range(3)] == [0, 0, 0]
    with pytest.raises(ValueError, match="one weight per dataset"):
        DatasetSteps([a, b], np.ones(1), seed=0)


class SimpleRank:
    def __init__(self, rank: int):
        self.rank = rank
