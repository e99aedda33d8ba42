"""Choosing a training dataset's preprocessing for images of a new site from their geometry."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medalloy.data.io import ImageMeta, read_geometry, read_image
from medalloy.data.preprocess import network_shape
from medalloy.planning.input_fit import FIT_TOLERANCE, InputGeometry, as_trained, choose_plan, geometry_of, misfit, size_ratio
from medalloy.planning.plan import ChannelNorm, NetworkPlan, Plan


def plan(name: str, median: list[int], spacing: list[float] | None = None, target: float = 1.0, channels: int = 1) -> Plan:
    dim = len(median)
    return Plan(
        dataset=name, dim=dim, in_channels=channels, target_spacing=[target] * dim, patch_size=[64] * dim, batch_size=2,
        normalization=[ChannelNorm(scheme="zscore")] * channels, label_values=[0, 1], labels={"background": 0, "lung": 1},
        network=NetworkPlan(kernels=[[3] * dim] * 3, strides=[[1] * dim, [2] * dim, [2] * dim], filters=[8, 16, 32]),
        median_shape=median, median_spacing=spacing or [],
    )  # fmt: skip


SMALL, LARGE = plan("JSRT", [224, 224], [1.0, 1.0]), plan("Shenzhen", [512, 512], [1.0, 1.0])
PNG = dict(spacing=None, channels=1)


def test_the_closest_typical_size_wins_whatever_the_order():
    for order in ([SMALL, LARGE], [LARGE, SMALL]):
        plans = {p.dataset: p for p in order}
        fit = choose_plan(plans, InputGeometry((500.0, 530.0), **PNG))
        assert fit.dataset == "Shenzhen" and not fit.rescale and "closest to Shenzhen's typical 512x512" in fit.reason and "JSRT x2." in fit.reason
        assert choose_plan(plans, InputGeometry((240.0, 200.0), **PNG)).dataset == "JSRT"
    # equal candidates: the first named (the training order) stays the choice
    twin = plan("Twin", [224, 224], [1.0, 1.0])
    assert choose_plan({"JSRT": SMALL, "Twin": twin}, InputGeometry((224.0, 224.0), **PNG)).dataset == "JSRT"
    assert choose_plan({"Twin": twin, "JSRT": SMALL}, InputGeometry((224.0, 224.0), **PNG)).dataset == "Twin"


def test_the_ratio_is_the_geometric_mean_over_axes_either_way():
    assert size_ratio(SMALL, InputGeometry((448.0, 448.0), **PNG)) == pytest.approx(2.0)
    assert size_ratio(SMALL, InputGeometry((112.0, 112.0), **PNG)) == pytest.approx(2.0)  # smaller counts as far as larger
    assert size_ratio(SMALL, InputGeometry((448.0, 224.0), **PNG)) == pytest.approx(2**0.5)
    assert size_ratio(SMALL, InputGeometry((448.0, 112.0), **PNG)) == pytest.approx(2.0)  # axes do not cancel out


def test_natural_images_far_from_every_candidate_are_resampled_to_the_closest():
    plans = {"JSRT": SMALL, "Shenzhen": LARGE}
    fit = choose_plan(plans, InputGeometry((1024.0, 1024.0), **PNG))
    assert fit.dataset == "Shenzhen" and fit.rescale and "fit no candidate within x1.25" in fit.reason
    assert misfit(LARGE, InputGeometry((1024.0, 1024.0), **PNG)) == pytest.approx(2.0)
    edge = 512 * FIT_TOLERANCE
    assert misfit(LARGE, InputGeometry((edge * 0.99,) * 2, **PNG)) is None and misfit(LARGE, InputGeometry((edge * 1.01,) * 2, **PNG)) is not None
    # images that carry a spacing are at the scale it says: never resampled beyond it
    physical = InputGeometry((1024.0, 1024.0), (1.0, 1.0), 1)
    assert not choose_plan(plans, physical).rescale and misfit(LARGE, physical) is None


def test_images_with_a_spacing_are_compared_in_millimetres():
    coarse = plan("Coarse", [100, 100, 40], [2.0, 2.0, 2.0])  # 200 mm across
    fine = plan("Fine", [200, 200, 80], [0.5, 0.5, 0.5])  # 100 mm across
    plans = {"Coarse": coarse, "Fine": fine}
    # 100 voxels of 1 mm: by millimetres the fine set's field of view; by voxels the coarse set's
    assert choose_plan(plans, InputGeometry((100.0, 100.0, 40.0), (1.0, 1.0, 1.0), 1)).dataset == "Fine"
    assert choose_plan(plans, InputGeometry((100.0, 100.0, 40.0), None, 1)).dataset == "Coarse"
    # a plan made before median_spacing was kept falls back to voxels
    old = plan("Old", [200, 200, 80])
    assert size_ratio(old, InputGeometry((100.0, 100.0, 40.0), (1.0, 1.0, 1.0), 1)) == pytest.approx(2.0)


def test_candidates_that_cannot_take_the_images_are_passed_over():
    rgb = plan("Endo", [224, 224], channels=3)
    plans = {"Endo": rgb, "Shenzhen": LARGE, "MR": plan("MR", [224, 224, 30])}
    fit = choose_plan(plans, InputGeometry((224.0, 224.0), None, 1))
    assert fit.dataset == "Shenzhen" and "Endo" not in fit.reason  # grey 2D images: not the 3D set, not the RGB one
    assert size_ratio(rgb, InputGeometry((224.0, 224.0), None, 3)) == pytest.approx(1.0)
    assert size_ratio(rgb, InputGeometry((224.0, 224.0), None, 1)) is None
    unprinted = plan("NoPrint", [224, 224]).model_copy(update={"median_shape": []})  # e.g. an imported model without a fingerprint
    fit = choose_plan({"MR": plans["MR"], "NoPrint": unprinted}, InputGeometry((224.0, 224.0), None, 1))
    assert fit.dataset == "MR" and "no candidate's fingerprint matches" in fit.reason and not fit.rescale


def test_as_trained_brings_an_image_to_the_plan_typical_network_size_keeping_its_grid():
    p = plan("JSRT", [224, 224], [1.0, 1.0], target=2.0)  # trained at 112 px in the network
    meta = ImageMeta(kind="png", shape=(512, 512), spacing=(1.0, 1.0))
    seen = as_trained(meta, p)
    assert seen.shape == meta.shape and network_shape(seen, p) == (112, 112) and network_shape(meta, p) == (256, 256)
    wide = as_trained(ImageMeta(kind="png", shape=(400, 600), spacing=(1.0, 1.0)), p)
    assert wide.spacing[0] == wide.spacing[1]  # one factor: proportions kept
    assert network_shape(wide, p)[1] / network_shape(wide, p)[0] == pytest.approx(1.5, abs=0.01)
    # the training set's own spacing is the unit its typical size is in
    mm = plan("DX", [224, 224], [0.5, 0.5], target=1.0)
    assert network_shape(as_trained(ImageMeta(kind="png", shape=(448, 448), spacing=(1.0, 1.0)), mm), mm) == (112, 112)


def test_geometry_of_takes_medians_and_headers_match_the_pixels(tmp_path):
    metas = [ImageMeta(kind="png", shape=(s, s + 10), spacing=(1.0, 1.0)) for s in (100, 300, 200)]
    g = geometry_of(metas)
    assert g.shape == (200.0, 210.0) and g.spacing is None and g.channels == 1
    nifti = [ImageMeta(kind="nifti", shape=(10, 10, 5), spacing=(1.0, 1.0, sp)) for sp in (2.0, 3.0, 5.0)]
    assert geometry_of(nifti).spacing == (1.0, 1.0, 3.0)
    with pytest.raises(ValueError, match="mixed"):
        geometry_of([metas[0], nifti[0]])
    for mode, arr in (("L", np.zeros((30, 40), np.uint8)), ("RGB", np.zeros((30, 40, 3), np.uint8)), ("RGBA", np.zeros((30, 40, 4), np.uint8))):
        path = tmp_path / f"{mode}.png"
        Image.fromarray(arr, mode).save(path)
        head, full = read_geometry(path), read_image(path)[1]
        assert (head.kind, head.shape, head.spacing, head.channels) == (full.kind, full.shape, full.spacing, full.channels), mode
