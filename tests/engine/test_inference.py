"""Predictor on models whose output is known: label values, TTA, slice-by-slice 2D on volumes, resampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medalloy.data.io import ImageMeta
from medalloy.engine.inference import Predictor
from medalloy.errors import MedalloyError
from medalloy.planning.plan import ChannelNorm, NetworkPlan, Plan

LABEL_VALUES = [0, 2, 5]
CENTRES = (0.0, 1.0, 2.0)


class NearestCentre(nn.Module):
    """Pointwise logits ``-(x - c_k)^2``: class k wins where the intensity is closest to ``c_k``.

    Pointwise, hence equivariant to mirroring and independent of the sliding-window tiling."""

    def __init__(self):
        super().__init__()
        self.register_buffer("centres", torch.tensor(CENTRES))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        c = self.centres.view(1, -1, *([1] * (x.ndim - 2)))
        return -((x[:, :1] - c) ** 2) * 4.0


class LeftBiased(NearestCentre):
    """Not mirror-symmetric: adds a bias to class 1 that grows along the last axis."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        ramp = torch.linspace(0, 3, x.shape[-1], dtype=x.dtype).view(*([1] * (x.ndim - 1)), -1)
        return out + torch.cat([torch.zeros_like(out[:, :1]), ramp.expand_as(out[:, 1:2]), torch.zeros_like(out[:, 2:])], 1)


def make_plan(dim: int, patch: list[int], target: list[float], slice_axis: int | None = None) -> Plan:
    return Plan(
        dataset="Toy",
        dim=dim,
        slice_axis=slice_axis,
        in_channels=1,
        target_spacing=target,
        patch_size=patch,
        batch_size=2,
        normalization=[ChannelNorm(scheme="none")],
        label_values=LABEL_VALUES,
        labels={"background": 0, "a": 2, "b": 5},
        network=NetworkPlan(kernels=[[3] * dim] * 3, strides=[[1] * dim] + [[2] * dim] * 2, filters=[4, 8, 16]),
    )


def _class_image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Class indices in blocks of 2 along every axis (so 2x resampling is exactly invertible)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 3, size=tuple((s + 1) // 2 for s in shape))
    for ax in range(len(shape)):
        coarse = np.repeat(coarse, 2, axis=ax)
    return coarse[tuple(slice(0, s) for s in shape)]


def _expected(classes: np.ndarray) -> np.ndarray:
    return np.asarray(LABEL_VALUES)[classes]


def test_2d_predict_maps_classes_to_label_values():
    classes = _class_image((20, 28))
    image = classes[None].astype(np.float32)
    meta = ImageMeta(kind="png", shape=(20, 28), spacing=(1.0, 1.0))
    pred = Predictor(NearestCentre(), make_plan(2, [16, 16], [1.0, 1.0]), precision="fp32").predict(image, meta)
    assert pred.shape == (20, 28) and pred.dtype == np.int64
    assert np.array_equal(pred, _expected(classes))
    assert set(np.unique(pred)) == {0, 2, 5}


def test_probabilities_are_softmax_of_the_model():
    image = np.linspace(0, 2, 12 * 16, dtype=np.float32).reshape(1, 12, 16)
    meta = ImageMeta(kind="png", shape=(12, 16), spacing=(1.0, 1.0))
    probs = Predictor(NearestCentre(), make_plan(2, [8, 8], [1.0, 1.0]), precision="fp32").predict_probabilities(image, meta)
    x = torch.from_numpy(image[0])
    ref = torch.softmax(torch.stack([-((x - c) ** 2) * 4.0 for c in CENTRES]), 0)
    assert probs.shape == (3, 12, 16)
    assert torch.allclose(probs, ref, atol=1e-5)


def test_tta_with_mirror_symmetric_model_equals_plain():
    classes = _class_image((18, 22), seed=1)
    image = (classes + np.random.default_rng(0).uniform(-0.3, 0.3, classes.shape))[None].astype(np.float32)
    meta = ImageMeta(kind="png", shape=(18, 22), spacing=(1.0, 1.0))
    plan = make_plan(2, [16, 16], [1.0, 1.0])
    plain = Predictor(NearestCentre(), plan, precision="fp32")
    model = NearestCentre()
    tta = Predictor(model, plan, precision="fp32", tta=True)
    p0 = plain.predict_probabilities(image, meta)
    p1 = tta.predict_probabilities(image, meta)
    assert torch.allclose(p0, p1, atol=1e-5)
    assert np.array_equal(plain.predict(image, meta), tta.predict(image, meta))
    assert np.array_equal(tta.predict(image, meta), _expected(classes))


def test_tta_averages_flips_of_an_asymmetric_model():
    image = np.full((1, 8, 8), 0.5, np.float32)  # equidistant from classes 0 and 1: the ramp decides
    meta = ImageMeta(kind="png", shape=(8, 8), spacing=(1.0, 1.0))
    plan = make_plan(2, [8, 8], [1.0, 1.0])
    plain = Predictor(LeftBiased(), plan, precision="fp32").predict_probabilities(image, meta)
    tta = Predictor(LeftBiased(), plan, precision="fp32", tta=True).predict_probabilities(image, meta)
    # identity, flip H, flip W, flip HW: the mean of the ramp and its mirror is constant along W
    manual = (plain + plain.flip(2) + plain + plain.flip(2)) / 4
    assert torch.allclose(tta, manual, atol=1e-5)
    assert not torch.allclose(plain, tta, atol=1e-3)
    assert torch.allclose(tta[:, :, 0], tta[:, :, -1], atol=1e-5)


def test_volume_with_2d_plan_is_predicted_slice_by_slice():
    classes = _class_image((10, 12, 7), seed=2)
    image = classes[None].astype(np.float32)
    # in-plane spacing = target spacing: no resampling, so every voxel's class is known exactly
    meta = ImageMeta(kind="nifti", shape=(10, 12, 7), spacing=(1.0, 1.0, 3.0))
    model = NearestCentre()
    predictor = Predictor(model, make_plan(2, [8, 8], [1.0, 1.0], slice_axis=2), precision="fp32", slice_batch=3)
    pred = predictor.predict(image, meta)
    assert pred.shape == (10, 12, 7)
    assert np.array_equal(pred, _expected(classes))
    # network space: (K, S, H, W) with the 7 slices of axis 2 in front, batched 3 at a time
    from medalloy.data.preprocess import to_network_space

    net_image, _ = to_network_space(image, None, meta, predictor.plan)
    probs_net = predictor.predict_network_space(net_image)
    assert probs_net.shape == (3, 7, 10, 12)
    assert np.array_equal(probs_net.argmax(0).numpy(), np.moveaxis(classes, 2, 0))
    # with in-plane resampling (2 mm) the grid comes back to the original shape
    coarse = Predictor(model, make_plan(2, [8, 8], [2.0, 2.0], slice_axis=2), precision="fp32")
    net_image, _ = to_network_space(image, None, meta, coarse.plan)
    assert coarse.predict_network_space(net_image).shape == (3, 7, 5, 6)
    probs = coarse.predict_probabilities(image, meta)
    assert probs.shape == (3, 10, 12, 7)
    assert torch.allclose(probs.sum(0), torch.ones(10, 12, 7), atol=1e-5)


def test_3d_plan_with_resampling_and_small_patch():
    # classes vary along axes 0 and 1 only, and only axis 2 is resampled (2 mm -> 1 mm): linear
    # interpolation of a constant is exact, so every voxel's class is known
    classes = np.repeat(_class_image((12, 10), seed=3)[..., None], 6, axis=2)
    image = classes[None].astype(np.float32)
    meta = ImageMeta(kind="nifti", shape=(12, 10, 6), spacing=(1.0, 1.0, 2.0))
    model = NearestCentre()
    # network grid (12, 10, 12) is larger than the patch: several windows
    predictor = Predictor(model, make_plan(3, [8, 8, 8], [1.0, 1.0, 1.0]), precision="fp32")
    pred = predictor.predict(image, meta)
    assert pred.shape == (12, 10, 6)
    assert np.array_equal(pred, _expected(classes))
    assert model.calls >= 2  # more than one batch of windows (sw_batch_size 4, 8 windows)


def test_image_smaller_than_patch():
    classes = _class_image((5, 6), seed=4)
    image = classes[None].astype(np.float32)
    meta = ImageMeta(kind="png", shape=(5, 6), spacing=(1.0, 1.0))
    pred = Predictor(NearestCentre(), make_plan(2, [16, 16], [1.0, 1.0]), precision="fp32").predict(image, meta)
    assert np.array_equal(pred, _expected(classes))


def test_to_labels_lut():
    probs = torch.zeros(3, 2, 2)
    probs[0, 0, 0] = probs[1, 0, 1] = probs[2, 1, 0] = probs[2, 1, 1] = 1.0
    p = Predictor(NearestCentre(), make_plan(2, [8, 8], [1.0, 1.0]), precision="fp32")
    assert p.to_labels(probs).tolist() == [[0, 2], [5, 5]]


class TwoTasks(nn.Module):
    """Sigmoid logits of two tasks: task a where x > 1.5, task b where x < 0.5 (pointwise)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, :1]
        return torch.cat([(v - 1.5) * 8.0, (0.5 - v) * 8.0], 1)


def test_sigmoid_tasks_become_labels_where_a_task_exceeds_one_half():
    image = np.array([[[0.0, 0.2, 1.0, 1.2], [1.8, 2.0, 0.45, 1.55]]], np.float32)  # (1, 2, 4)
    meta = ImageMeta(kind="png", shape=(2, 4), spacing=(1.0, 1.0))
    predictor = Predictor(TwoTasks(), make_plan(2, [8, 8], [1.0, 1.0]), precision="fp32", activation="sigmoid")
    probs = predictor.predict_probabilities(image, meta)
    assert probs.shape == (2, 2, 4)
    x = torch.from_numpy(image[0])
    torch.testing.assert_close(probs[0], torch.sigmoid((x - 1.5) * 8.0), atol=1e-5, rtol=1e-4)
    # task order = label_values[1:] = (2, 5): a -> 2, b -> 5, neither -> background
    assert predictor.to_labels(probs).tolist() == [[5, 5, 0, 0], [2, 2, 5, 2]]
    with pytest.raises(ValueError, match="activation"):
        Predictor(TwoTasks(), make_plan(2, [8, 8], [1.0, 1.0]), activation="relu")


def test_dynunet_predictor_runs_in_bf16():
    from medalloy.models import build_unet

    plan = make_plan(2, [16, 16], [1.0, 1.0])
    net = build_unet(plan.network, plan.in_channels, plan.num_classes)
    image = np.random.default_rng(0).normal(size=(1, 20, 20)).astype(np.float32)
    meta = ImageMeta(kind="png", shape=(20, 20), spacing=(1.0, 1.0))
    probs = Predictor(net, plan, precision="bf16").predict_probabilities(image, meta)
    assert probs.dtype == torch.float32 and probs.shape == (3, 20, 20)
    assert torch.allclose(probs.sum(0), torch.ones(20, 20), atol=1e-3)
    with pytest.raises(MedalloyError, match="fp16"):
        Predictor(net, plan, precision="fp16")  # no fp16 autocast on CPU


def test_where_two_tasks_exceed_one_half_the_more_probable_wins():
    # task a: 0.9 left, 0.6 right; task b: 0.7 everywhere (both > 0.5 in every pixel)
    probs = torch.tensor([[[0.9, 0.6]], [[0.7, 0.7]]])
    predictor = Predictor(TwoTasks(), make_plan(2, [8, 8], [1.0, 1.0]), precision="fp32", activation="sigmoid")
    assert predictor.to_labels(probs).tolist() == [[2, 5]]
    assert predictor.to_labels(torch.tensor([[[0.4, 0.5]], [[0.3, 0.2]]])).tolist() == [[0, 0]]  # 0.5 itself is not above
