"""Network space and back: slice axis, resampling, normalisation, label mapping, padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medalloy.data.io import ImageMeta
from medalloy.data.preprocess import (
    foreground_coords,
    from_network_space,
    network_shape,
    normalize,
    pad_to_patch,
    to_class_indices,
    to_network_space,
)
from medalloy.errors import MedalloyError
from medalloy.planning.plan import ChannelNorm, NetworkPlan, Plan

LABEL_VALUES = [0, 2, 5]


def make_plan(dim: int, target: list[float], norms: list[ChannelNorm] | None = None, slice_axis: int | None = None) -> Plan:
    norms = norms or [ChannelNorm(scheme="none")]
    return Plan(
        dataset="Toy",
        dim=dim,
        slice_axis=slice_axis,
        in_channels=len(norms),
        target_spacing=target,
        patch_size=[8] * dim,
        batch_size=2,
        normalization=norms,
        label_values=LABEL_VALUES,
        labels={"background": 0, "a": 2, "b": 5},
        network=NetworkPlan(kernels=[[3] * dim] * 3, strides=[[1] * dim] + [[2] * dim] * 2, filters=[4, 8, 16]),
    )


def _blocks(shape: tuple[int, ...]) -> np.ndarray:
    """Label values 0/2/5 in blocks aligned to even indices (so 2x resampling is exactly invertible)."""
    lab = np.zeros(shape, dtype=np.int64)
    idx = np.indices(shape)
    lab[(idx[0] // 2 + idx[1] // 2) % 3 == 1] = 2
    lab[(idx[0] // 2 + idx[1] // 2) % 3 == 2] = 5
    return lab


def _onehot(net_label: np.ndarray, k: int) -> torch.Tensor:
    """Class indices (*net) -> one-hot probabilities (K, *net)."""
    return torch.nn.functional.one_hot(torch.from_numpy(net_label.astype(np.int64)), k).movedim(-1, 0).float()


def _back_to_values(probs: torch.Tensor) -> np.ndarray:
    return np.asarray(LABEL_VALUES)[probs.argmax(0).numpy()]


def test_2d_image_round_trip_upsampling():
    shape = (10, 14)
    label = _blocks(shape)
    image = np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32)
    meta = ImageMeta(kind="png", shape=shape, spacing=(1.0, 1.0))
    plan = make_plan(2, [0.5, 0.5])
    net_img, net_lab = to_network_space(image, label, meta, plan)
    assert net_img.shape == (1, 1, 20, 28) and net_img.dtype == np.float32
    assert net_lab.shape == (1, 20, 28) and net_lab.dtype == np.int16
    assert set(np.unique(net_lab)) == {0, 1, 2}  # class indices, not label values
    probs = from_network_space(_onehot(net_lab, 3), meta, plan)
    assert probs.shape == (3, 10, 14)
    assert np.array_equal(_back_to_values(probs), label)


def test_3d_volume_with_2d_plan_slice_axis_2():
    shape = (8, 12, 5)
    label = _blocks(shape)
    rng = np.random.default_rng(1)
    image = rng.normal(size=(1, *shape)).astype(np.float32)
    meta = ImageMeta(kind="nifti", shape=shape, spacing=(1.0, 1.0, 3.0))
    # without resampling each network slice is exactly one volume slice along axis 2
    same = make_plan(2, [1.0, 1.0], slice_axis=2)
    net_img, net_lab = to_network_space(image, label, meta, same)
    assert net_img.shape == (1, 5, 8, 12)
    for s in range(5):
        assert np.array_equal(net_img[:, s], image[..., s])
    # with resampling (x2 coarser in-plane) and back
    plan = make_plan(2, [2.0, 2.0], slice_axis=2)
    assert network_shape(meta, plan) == (4, 6)
    net_img, net_lab = to_network_space(image, label, meta, plan)
    assert net_img.shape == (1, 5, 4, 6) and net_lab.shape == (5, 4, 6)
    probs = from_network_space(_onehot(net_lab, 3), meta, plan)
    assert probs.shape == (3, 8, 12, 5)
    assert np.array_equal(_back_to_values(probs), label)


def test_3d_volume_with_2d_plan_slice_axis_0():
    shape = (3, 6, 4)
    image = np.arange(np.prod(shape), dtype=np.float32).reshape(1, *shape)
    meta = ImageMeta(kind="nifti", shape=shape, spacing=(4.0, 1.0, 1.0))
    plan = make_plan(2, [1.0, 1.0], slice_axis=0)
    net_img, _ = to_network_space(image, None, meta, plan)
    assert net_img.shape == (1, 3, 6, 4) and np.array_equal(net_img, image)
    probs = torch.from_numpy(np.concatenate([net_img, -net_img]))
    back = from_network_space(probs, meta, plan)
    assert back.shape == (2, 3, 6, 4) and torch.equal(back[0], torch.from_numpy(image[0]))


def test_3d_plan_anisotropic_resampling_round_trip():
    shape = (8, 12, 6)
    label = _blocks(shape)
    image = np.random.default_rng(2).normal(size=(1, *shape)).astype(np.float32)
    meta = ImageMeta(kind="nifti", shape=shape, spacing=(1.0, 1.0, 2.0))
    plan = make_plan(3, [2.0, 2.0, 1.0])  # coarser in-plane, finer through-plane
    assert network_shape(meta, plan) == (4, 6, 12)
    net_img, net_lab = to_network_space(image, label, meta, plan)
    assert net_img.shape == (1, 4, 6, 12) and net_lab.shape == (4, 6, 12)
    probs = from_network_space(_onehot(net_lab, 3), meta, plan)
    assert probs.shape == (3, 8, 12, 6)
    assert np.array_equal(_back_to_values(probs), label)


def test_network_shape_rounding():
    meta = ImageMeta(kind="nifti", shape=(10, 7, 3), spacing=(0.7, 0.7, 3.0))
    assert network_shape(meta, make_plan(3, [1.0, 1.0, 1.0])) == (7, 5, 9)  # round(7.0), round(4.9), round(9)
    assert network_shape(meta, make_plan(2, [1.4, 1.4], slice_axis=2)) == (5, 4)  # round(3.5) = 4 (banker's)


# -- normalisation ---------------------------------------------------------------------------------
def test_normalisation_schemes():
    rng = np.random.default_rng(3)
    image = np.stack([rng.normal(50, 10, (6, 6)), rng.uniform(-2000, 3000, (6, 6)), rng.integers(0, 256, (6, 6)), rng.normal(size=(6, 6))])
    norms = [
        ChannelNorm(scheme="zscore"),
        ChannelNorm(scheme="ct", clip_low=-1000.0, clip_high=1000.0, mean=100.0, std=50.0),
        ChannelNorm(scheme="rgb"),
        ChannelNorm(scheme="none"),
    ]
    out = normalize(image, norms)
    assert out.dtype == np.float32
    assert abs(out[0].mean()) < 1e-5 and out[0].std() == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(out[1], (np.clip(image[1], -1000, 1000) - 100) / 50, atol=1e-4)
    assert out[1].min() == pytest.approx(-22.0) and out[1].max() == pytest.approx(18.0)
    assert np.allclose(out[2], image[2] / 255.0)
    assert np.allclose(out[3], image[3])


def test_zscore_of_constant_image_is_finite():
    out = normalize(np.full((1, 3, 3), 7.0), [ChannelNorm(scheme="zscore")])
    assert np.all(out == 0.0)


def test_nan_image_raises_naming_file():
    image = np.zeros((1, 4, 4), np.float32)
    image[0, 1, 1] = np.nan
    with pytest.raises(MedalloyError, match="NaN") as exc:
        normalize(image, [ChannelNorm(scheme="zscore")], path="case_0000.png")
    assert "case_0000.png" in str(exc.value) and "\n" not in str(exc.value)
    meta = ImageMeta(kind="png", shape=(4, 4), spacing=(1.0, 1.0))
    with pytest.raises(MedalloyError, match="NaN"):
        to_network_space(image, None, meta, make_plan(2, [1.0, 1.0]), "x.png")


def test_channel_count_mismatch():
    with pytest.raises(MedalloyError, match="2 channels, the plan expects 1"):
        normalize(np.zeros((2, 3, 3)), [ChannelNorm(scheme="none")], path="p")


# -- labels ----------------------------------------------------------------------------------------
def test_to_class_indices_non_consecutive():
    plan = make_plan(2, [1.0, 1.0])
    label = np.array([[0, 2, 5], [5, 2, 0]])
    assert np.array_equal(to_class_indices(label, plan), [[0, 1, 2], [2, 1, 0]])


def test_to_class_indices_unknown_values_named():
    plan = make_plan(2, [1.0, 1.0])
    label = np.array([[0, 2, 3], [7, 5, 3]])
    with pytest.raises(MedalloyError) as exc:
        to_class_indices(label, plan, path="lab.png")
    msg = str(exc.value)
    assert "[3, 7]" in msg and "lab.png" in msg and "\n" not in msg
    with pytest.raises(MedalloyError, match="negative"):
        to_class_indices(np.array([[0, -1]]), plan, path="lab.png")


def test_plan_dimension_errors():
    vol = np.zeros((1, 4, 4, 4), np.float32)
    meta3 = ImageMeta(kind="nifti", shape=(4, 4, 4), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(MedalloyError, match="slice_axis"):
        to_network_space(vol, None, meta3, make_plan(2, [1.0, 1.0]), "v.nii.gz")
    meta2 = ImageMeta(kind="png", shape=(4, 4), spacing=(1.0, 1.0))
    with pytest.raises(MedalloyError, match="3D plan needs 3D images"):
        to_network_space(vol[:, 0], None, meta2, make_plan(3, [1.0, 1.0, 1.0]), "i.png")


# -- padding and foreground ------------------------------------------------------------------------
def test_pad_to_patch_2d_image():
    image = np.ones((1, 1, 5, 7), np.float32)  # (C, S, H, W) as a 2D plan holds it
    label = np.ones((1, 5, 7), np.int16)
    img, lab, pads = pad_to_patch(image, label, [8, 8])
    assert pads == [(1, 2), (0, 1)]
    assert img.shape == (1, 1, 8, 8) and lab.shape == (1, 8, 8)
    assert np.array_equal(img[0, 0, 1:6, 0:7], image[0, 0]) and img.sum() == 35
    assert lab[0, 0].sum() == 0 and lab.sum() == 35


def test_pad_to_patch_noop_and_3d():
    image = np.zeros((2, 9, 9), np.float32)
    img, lab, pads = pad_to_patch(image, None, [8, 8])
    assert img is image and lab is None and pads == [(0, 0), (0, 0)]
    vol = np.ones((1, 3, 10, 4), np.float32)
    img, _, pads = pad_to_patch(vol, None, [4, 8, 8])
    assert pads == [(0, 1), (0, 0), (2, 2)] and img.shape == (1, 4, 10, 8)


def test_foreground_coords():
    label = np.zeros((6, 6), np.int16)
    label[1, 2] = 1
    label[3:5, 3:5] = 2
    fg = foreground_coords(label, 4, np.random.default_rng(0))
    assert set(fg) == {1, 2}  # absent class 3 is left out
    assert fg[1].tolist() == [[1, 2]]
    assert sorted(map(tuple, fg[2].tolist())) == [(3, 3), (3, 4), (4, 3), (4, 4)]
    capped = foreground_coords(label, 3, np.random.default_rng(0), max_per_class=2)
    assert len(capped[2]) == 2 and all(label[tuple(c)] == 2 for c in capped[2])
