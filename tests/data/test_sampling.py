"""PatchSampler: per-step determinism, foreground oversampling, 2D slices of volumes, small images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medalloy.data.io import ImageMeta
from medalloy.data.preprocess import PreparedCase, foreground_coords, pad_to_patch
from medalloy.data.sampling import PatchSampler
from medalloy.data.transforms import AugmentConfig
from medalloy.engine.distributed import DistInfo

OFF = AugmentConfig(enabled=False)


def _coded_case(case_id: str, spatial: tuple[int, ...], dim: int, fg_at: tuple[int, ...] | None = None, offset: float = 0.0) -> PreparedCase:
    """A case whose image value encodes the voxel position (so a patch tells where it was cut)."""
    net_spatial = spatial  # 2D plans: (S, H, W); 3D plans: (D, H, W)
    grids = np.indices(net_spatial)
    code = sum(g * 100 ** (len(net_spatial) - 1 - a) for a, g in enumerate(grids)).astype(np.float32) + offset
    image = code[None]
    label = np.zeros(net_spatial, np.int16)
    if fg_at is not None:
        label[fg_at] = 1
    fg = foreground_coords(label, 2, np.random.default_rng(0))
    return PreparedCase(case_id, image, label, ImageMeta(kind="nifti", shape=net_spatial, spacing=(1.0,) * len(net_spatial)), fg=fg)


def _equal(a: dict, b: dict) -> bool:
    return torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


@pytest.mark.parametrize("augment", [OFF, AugmentConfig(p_affine=1.0, p_noise=1.0)])
def test_batch_depends_only_on_seed_and_step(augment):
    cases = [_coded_case("a", (1, 20, 20), 2, (0, 5, 5)), _coded_case("b", (1, 24, 18), 2, (0, 3, 12), 1e6)]
    first = PatchSampler(cases, [8, 8], 4, 2, seed=3, augment=augment).sample(5)
    sampler = PatchSampler(cases, [8, 8], 4, 2, seed=3, augment=augment)
    batches = [sampler.sample(s) for s in range(6)]
    assert _equal(first, batches[5])
    assert first["image"].shape == (4, 1, 8, 8) and first["label"].shape == (4, 1, 8, 8)
    assert first["image"].dtype == torch.float32 and first["label"].dtype == torch.int64
    # plain tensors, not MONAI MetaTensors (whose metadata tracking slows every network op)
    assert type(first["image"]) is torch.Tensor and type(first["label"]) is torch.Tensor
    # different steps, seeds and ranks give different batches
    assert not torch.equal(batches[4]["image"], batches[5]["image"])
    assert not torch.equal(PatchSampler(cases, [8, 8], 4, 2, seed=4, augment=augment).sample(5)["image"], first["image"])
    assert not torch.equal(sampler(5, DistInfo(rank=1, world_size=2))["image"], first["image"])
    assert _equal(sampler(5, DistInfo(rank=0, world_size=2)), first)


def test_foreground_oversampling_with_tiny_object():
    # one foreground voxel in a 40x40 image: a random 8x8 patch holds it with p ~ 4%
    case = _coded_case("a", (1, 40, 40), 2, (0, 30, 7))
    batch_size = 6
    n_fg = round(batch_size * 0.33)
    sampler = PatchSampler([case], [8, 8], batch_size, 2, seed=0, foreground_oversample=0.33, augment=OFF)
    forced = unforced = 0
    for step in range(30):
        lab = sampler.sample(step)["label"]
        has_fg = lab.flatten(1).amax(1) > 0
        assert has_fg[batch_size - n_fg :].all(), step
        forced += int(has_fg[batch_size - n_fg :].sum())
        unforced += int(has_fg[: batch_size - n_fg].sum())
    assert forced == 30 * n_fg
    assert unforced < 30  # the random part is not biased towards the object


def test_no_oversampling_when_zero():
    case = _coded_case("a", (1, 40, 40), 2, (0, 30, 7))
    sampler = PatchSampler([case], [8, 8], 4, 2, seed=0, foreground_oversample=0.0, augment=OFF)
    hits = sum(int((sampler.sample(s)["label"].flatten(1).amax(1) > 0).sum()) for s in range(20))
    assert hits < 20


def test_3d_oversampling_and_patch_content():
    case = _coded_case("a", (16, 16, 12), 3, (13, 2, 9))
    sampler = PatchSampler([case], [8, 8, 4], 3, 3, seed=1, foreground_oversample=0.5, augment=OFF)
    for step in range(10):
        batch = sampler.sample(step)
        assert batch["image"].shape == (3, 1, 8, 8, 4)
        assert batch["label"][-2:].flatten(1).amax(1).min() == 1  # round(3 * 0.5) = 2 forced
        for i in range(3):
            img = batch["image"][i, 0].numpy()
            # a contiguous crop: the code at (0, 0, 0) locates it and the rest follows
            c0 = img[0, 0, 0]
            z, y, x = int(c0 // 10000), int(c0 // 100 % 100), int(c0 % 100)
            assert np.array_equal(img, case.image[0, z : z + 8, y : y + 8, x : x + 4])
            assert np.array_equal(batch["label"][i, 0].numpy(), case.label[z : z + 8, y : y + 8, x : x + 4])


def test_2d_sampling_on_3d_volume_takes_single_slices():
    # 2D plan on a volume: network space (C, S, H, W); each patch must come from one slice
    case = _coded_case("v", (6, 12, 10), 2, (4, 6, 6))
    sampler = PatchSampler([case], [8, 8], 6, 2, seed=2, foreground_oversample=0.5, augment=OFF)
    seen_slices = set()
    for step in range(8):
        batch = sampler.sample(step)
        assert batch["image"].shape == (6, 1, 8, 8)
        for i in range(6):
            img = batch["image"][i, 0].numpy()
            c0 = img[0, 0]
            s, y, x = int(c0 // 10000), int(c0 // 100 % 100), int(c0 % 100)
            assert np.array_equal(img, case.image[0, s, y : y + 8, x : x + 8])
            seen_slices.add(s)
            if i >= 3:  # forced foreground: the object's slice
                assert s == 4 and batch["label"][i].max() == 1
    assert len(seen_slices) > 2


def test_image_smaller_than_patch_after_padding():
    image = np.ones((1, 1, 5, 6), np.float32)
    label = np.zeros((1, 5, 6), np.int16)
    label[0, 2, 3] = 1
    image, label, pads = pad_to_patch(image, label, [8, 8])
    fg = foreground_coords(label, 2, np.random.default_rng(0))
    case = PreparedCase("s", image, label, ImageMeta(kind="png", shape=(5, 6), spacing=(1.0, 1.0)), fg=fg, pad=pads)
    sampler = PatchSampler([case], [8, 8], 3, 2, seed=0, augment=OFF)
    batch = sampler.sample(0)
    assert batch["image"].shape == (3, 1, 8, 8)
    assert batch["image"].sum() == 3 * 30  # the whole (padded) image each time
    assert (batch["label"].flatten(1).sum(1) == 1).all()


def test_case_weights_and_errors():
    a = _coded_case("a", (1, 8, 8), 2, offset=0.0)
    b = _coded_case("b", (1, 8, 8), 2, offset=1e6)
    only_b = PatchSampler([a, b], [8, 8], 4, 2, augment=OFF, case_weights=[0.0, 1.0]).sample(0)
    assert (only_b["image"].amin(dim=(1, 2, 3)) >= 1e6).all()
    with pytest.raises(ValueError):
        PatchSampler([], [8, 8], 2, 2)
