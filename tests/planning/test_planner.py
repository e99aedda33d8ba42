"""Planner: dimension, spacing, patch, network layout, batch, normalisation, labels, files, real data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from planning_toys import ToyCase, forward_shape, write_dataset

from medalloy.data.dataset import RawDataset
from medalloy.errors import MedalloyError
from medalloy.planning.fingerprint import fingerprint, load_fingerprint
from medalloy.planning.plan import NetworkPlan, load_plan, save_plan
from medalloy.planning.planner import is_ct_channel, plan_and_save, plan_dataset

LABELS = {"background": 0, "a": 1, "b": 2}


def _label(shape: tuple[int, ...]) -> np.ndarray:
    """Labels 1 and 2 in two corners, so every case has foreground of both classes."""
    lab = np.zeros(shape, np.uint8)
    lab[tuple(slice(0, 3) for _ in shape)] = 1
    lab[tuple(slice(-3, None) for _ in shape)] = 2
    return lab


def grey_2d(tmp_path, shape=(40, 48), n=3, name="Grey"):
    rng = np.random.default_rng(0)
    cases = {f"c{i}": ToyCase(rng.integers(0, 256, (1, *shape)).astype(np.uint8), _label(shape)) for i in range(n)}
    return write_dataset(tmp_path / f"Dataset010_{name}", cases, {"0": "X-ray"}, LABELS, ".png", name)


def volumes(tmp_path, shape, spacing, name="Vol", channel_names=None, n=2, offset=0.0):
    rng = np.random.default_rng(1)
    channel_names = channel_names or {"0": "MRI"}
    c = len(channel_names)
    cases = {f"v{i}": ToyCase((rng.random((c, *shape)) * 100 + offset).astype(np.float32), _label(shape), spacing) for i in range(n)}
    return write_dataset(tmp_path / f"Dataset020_{name}", cases, channel_names, LABELS, ".nii.gz", name)


def plan_of(ds, **kw):
    return plan_dataset(ds, fingerprint(ds, progress=False), **kw)


# -- 2D ------------------------------------------------------------------------------------------
def test_grey_2d_hand_worked_plan_builds_a_working_dynunet(tmp_path):
    plan = plan_of(grey_2d(tmp_path))
    assert (plan.dim, plan.slice_axis, plan.in_channels) == (2, None, 1)
    assert plan.target_spacing == [1.0, 1.0]
    # 40 -> 20 -> 10 -> 5 and 48 -> 24 -> 12 -> 6: three poolings, then both sizes are < 8.
    assert plan.patch_size == [40, 48]
    assert plan.network.strides == [[1, 1], [2, 2], [2, 2], [2, 2]]
    assert plan.network.kernels == [[3, 3]] * 4
    assert plan.network.filters == [16, 32, 64, 128]
    assert plan.batch_size == 32  # 150528 / 1920 = 78, clamped to 32
    assert [n.scheme for n in plan.normalization] == ["zscore"]
    assert plan.label_values == [0, 1, 2] and plan.labels == LABELS and plan.num_classes == 3
    assert plan.median_shape == [40, 48]
    assert forward_shape(plan) == (1, 3, 40, 48)


@pytest.mark.parametrize(
    ("shape", "max_side", "spacing", "patch", "strides"),
    [
        # fits: 50 -> 25 -> 12.5 -> 6.25 and 36 -> 18 -> 9 -> 4.5, 3 pools each, rounded up to 8s
        ((50, 36), 256, [1.0, 1.0], [56, 40], [[1, 1], [2, 2], [2, 2], [2, 2]]),
        # too large: 96x64 at max side 48 -> spacing 2, image 48x32
        ((96, 64), 48, [2.0, 2.0], [48, 32], [[1, 1], [2, 2], [2, 2], [2, 2]]),
        # 12 -> 6 and 20 -> 10 -> 5: one axis pools once, the other twice
        ((12, 20), 256, [1.0, 1.0], [12, 20], [[1, 1], [2, 2], [1, 2]]),
    ],
)
def test_2d_spacing_and_patch_rounding(tmp_path, shape, max_side, spacing, patch, strides):
    plan = plan_of(grey_2d(tmp_path, shape), max_2d_side=max_side)
    assert plan.target_spacing == pytest.approx(spacing)
    assert plan.patch_size == patch and plan.network.strides == strides
    pools = np.sum(np.asarray(strides) == 2, axis=0)
    assert all(p % 2**k == 0 for p, k in zip(plan.patch_size, pools))
    assert plan.network.total_stride() == [2**k for k in pools]  # per axis: (12, 20) pools once and twice -> [2, 4]
    assert forward_shape(plan) == (1, 3, *patch)


def test_max_2d_patch_crops_at_full_resolution(tmp_path):
    plan = plan_of(grey_2d(tmp_path, (96, 64)), max_2d_patch=40)
    # spacing kept (the image is not shrunk); 40 -> 5 after 3 pools: rounded up stays 40
    assert plan.target_spacing == pytest.approx([1.0, 1.0])
    assert plan.patch_size == [40, 40] and plan.network.strides == [[1, 1], [2, 2], [2, 2], [2, 2]]
    assert any("max_2d_patch=40" in n for n in plan.notes)
    # an image already smaller than the cap is unaffected, and the note says nothing of a cut
    small = plan_of(grey_2d(tmp_path, (50, 36), name="Small"), max_2d_patch=64)
    assert small.patch_size == [56, 40] and not any("max_2d_patch" in n for n in small.notes)
    with pytest.raises(MedalloyError, match="max_2d_patch must be >= 16"):
        plan_of(grey_2d(tmp_path, name="Tiny"), max_2d_patch=8)


def test_batch_and_filter_settings(tmp_path):
    plan = plan_of(grey_2d(tmp_path), batch_2d=5, base_filters=8, max_filters=32)
    assert plan.batch_size == 5 and plan.network.filters == [8, 16, 32, 32]
    # 150528 / (256 * 256) = 2.3 -> 2
    assert plan_of(grey_2d(tmp_path, (256, 256), n=1, name="Big")).batch_size == 2


def test_rgb_png_plan(tmp_path):
    rng = np.random.default_rng(3)
    cases = {f"p{i}": ToyCase(rng.integers(0, 256, (3, 32, 32)).astype(np.uint8), _label((32, 32))) for i in range(2)}
    ds = write_dataset(tmp_path / "Dataset030_Rgb", cases, {"0": "R", "1": "G", "2": "B"}, LABELS, ".png", "Rgb")
    plan = plan_of(ds)
    assert plan.in_channels == 3 and [n.scheme for n in plan.normalization] == ["rgb"] * 3
    assert plan.patch_size == [32, 32]
    assert forward_shape(plan) == (1, 3, 32, 32)


# -- 3D ------------------------------------------------------------------------------------------
def test_isotropic_volume_gives_3d_plan(tmp_path):
    plan = plan_of(volumes(tmp_path, (20, 24, 16), (1.0, 1.0, 1.0)))
    assert (plan.dim, plan.slice_axis) == (3, None)
    assert plan.target_spacing == [1.0, 1.0, 1.0] and plan.patch_size == [20, 24, 16]
    assert plan.network.strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2]]
    assert plan.network.kernels == [[3, 3, 3]] * 3
    assert plan.network.filters == [16, 32, 64] and plan.batch_size == 2
    assert forward_shape(plan) == (1, 3, 20, 24, 16)


def test_3d_patch_is_capped_by_shrinking_the_largest_axes(tmp_path):
    # 20x24x16 = 7680 > 4096: 24 -> 20, then 20 (first) -> 16, then 20 -> 16.
    plan = plan_of(volumes(tmp_path, (20, 24, 16), (1.0, 1.0, 1.0)), max_3d_voxels=16**3)
    assert plan.patch_size == [16, 16, 16] and plan.target_spacing == [1.0, 1.0, 1.0]
    assert plan.network.strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2]]


def test_3d_spacing_is_coarsened_finer_axes_first_when_far_over_budget(tmp_path):
    ds = volumes(tmp_path, (40, 40, 20), (1.0, 1.0, 2.0))
    fp = fingerprint(ds, progress=False)
    plan = plan_dataset(ds, fp, max_3d_voxels=64)
    t = np.asarray(plan.target_spacing)
    # x, y first reach z's 2 mm, then all axes grow together: the result is isotropic.
    assert t[0] == pytest.approx(t[1]) == pytest.approx(t[2]) and t[0] > 2.0
    volume = lambda s: 40 / s * 40 / s * 40 / s  # noqa: E731 (extent in mm: 40 x 40 x 40)
    assert volume(t[0]) <= 8 * 64 < volume(t[0] / 1.05)  # the smallest 5 % step that fits
    # 64 voxels cannot hold a valid DynUNet: the patch stops at the smallest one (two poolings).
    assert len(plan.network.strides) == 3 and int(np.prod(plan.patch_size)) <= 16**3


def test_anisotropic_spacing_gives_2d_per_slice(tmp_path):
    plan = plan_of(volumes(tmp_path, (32, 32, 12), (1.0, 1.0, 4.0)))
    assert (plan.dim, plan.slice_axis) == (2, 2)
    assert plan.target_spacing == [1.0, 1.0] and plan.patch_size == [32, 32]
    assert any("axis 2" in n and "spacing ratio 4" in n for n in plan.notes)
    assert plan.median_shape == [32, 32, 12]
    assert forward_shape(plan) == (1, 3, 32, 32)


def test_anisotropic_spacing_on_first_axis_slices_along_it(tmp_path):
    plan = plan_of(volumes(tmp_path, (12, 30, 32), (4.0, 0.5, 0.5)))
    assert (plan.dim, plan.slice_axis) == (2, 0) and plan.target_spacing == [0.5, 0.5]
    assert plan.patch_size == [32, 32]  # 30 rounded up to a multiple of 8


def test_forced_3d_on_anisotropic_data_uses_nnunet_kernels(tmp_path):
    """Hand-worked: patch 32x32x12 at 1x1x4 mm.

    stage 0: z is 4x coarser than x -> kernel [3,3,1], z not pooled;
    stage 1: pool x,y -> 16x16x12 at 2x2x4 (ratio 2: kernel 3, z may pool again);
    stage 2: pool all -> 8x8x6 at 4x4x8; stage 3: pool x,y (6 < 8) -> 4x4x6; then nothing is >= 8.
    """
    plan = plan_of(volumes(tmp_path, (32, 32, 12), (1.0, 1.0, 4.0)), force_dim=3)
    assert (plan.dim, plan.slice_axis) == (3, None)
    assert plan.target_spacing == [1.0, 1.0, 4.0] and plan.patch_size == [32, 32, 12]
    assert plan.network.strides == [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 1]]
    assert plan.network.kernels == [[3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
    assert plan.network.filters == [16, 32, 64, 128]
    assert forward_shape(plan) == (1, 3, 32, 32, 12)


@pytest.mark.parametrize(
    ("shape", "dim", "slice_axis", "patch"),
    [
        ((40, 48, 6), 2, 2, [40, 48]),  # 6 < 48 / 4 although the header says 1 mm
        ((6, 40, 48), 2, 0, [40, 48]),
        ((40, 48, 11), 2, 2, [40, 48]),  # 11 < 12
        ((40, 48, 12), 3, None, [40, 48, 12]),  # 12 is not < 12: 3D
    ],
)
def test_few_slices_with_1mm_header(tmp_path, shape, dim, slice_axis, patch):
    plan = plan_of(volumes(tmp_path, shape, (1.0, 1.0, 1.0)))
    assert (plan.dim, plan.slice_axis, plan.patch_size) == (dim, slice_axis, patch)
    if dim == 2:
        in_plane = "x".join(str(s) for a, s in enumerate(shape) if a != slice_axis)
        assert any(f"{shape[slice_axis]} slices vs {in_plane} px" in n for n in plan.notes)


def test_forced_2d_on_isotropic_volume_slices_the_shortest_axis(tmp_path):
    plan = plan_of(volumes(tmp_path, (20, 24, 16), (1.0, 1.0, 1.0)), force_dim=2)
    assert (plan.dim, plan.slice_axis, plan.patch_size) == (2, 2, [20, 24])  # equal spacing: fewest voxels


# -- normalisation ---------------------------------------------------------------------------------
def test_ct_channel_uses_foreground_statistics(tmp_path):
    ds = volumes(tmp_path, (16, 16, 16), (1.0, 1.0, 1.0), "Ct", {"0": "CT", "1": "PET"}, offset=-50.0)
    plan = plan_of(ds)
    assert [n.scheme for n in plan.normalization] == ["ct", "zscore"] and plan.in_channels == 2
    fg = np.concatenate([ds.load(c)[0][0][ds.load(c)[1] > 0] for c in ds.cases]).astype(float)
    ct = plan.normalization[0]
    assert ct.clip_low == pytest.approx(np.percentile(fg, 0.5)) and ct.clip_high == pytest.approx(np.percentile(fg, 99.5))
    assert ct.mean == pytest.approx(fg.mean()) and ct.std == pytest.approx(fg.std())
    assert plan.normalization[1].mean is None
    assert forward_shape(plan) == (1, 3, 16, 16, 16)


@pytest.mark.parametrize(
    ("name", "ct"),
    [
        ("CT", True),
        ("ct_arterial", True),
        ("non-contrast ct", True),
        ("CECT", True),
        ("PET/CT", True),
        ("spectral MRI", False),
        ("rectal", False),
        ("cine-MRI", False),
        ("X-ray", False),
    ],
)
def test_ct_channel_names(name, ct):
    assert is_ct_channel(name) is ct


# -- plan files and errors -------------------------------------------------------------------------
def test_plan_round_trips_through_json(tmp_path):
    plan = plan_of(volumes(tmp_path, (32, 32, 12), (1.0, 1.0, 4.0)), force_dim=3)
    path = save_plan(plan, tmp_path / "plan.json")
    assert load_plan(path) == plan


def test_plan_and_save_writes_plan_and_fingerprint_and_refuses_overwrite(tmp_path):
    ds = grey_2d(tmp_path)
    out = tmp_path / "plans" / "plan.json"
    plan = plan_and_save(ds.root, out, max_cases=2, progress=False, batch_2d=4)
    assert load_plan(out) == plan and plan.batch_size == 4
    fp = load_fingerprint(tmp_path / "plans" / "fingerprint.json")
    assert fp["num_cases_fingerprinted"] == 2 and fp["dataset"] == "Grey"
    before = out.read_text(encoding="utf-8")
    with pytest.raises(MedalloyError, match=r"plan\.json: file already exists"):
        plan_and_save(ds.root, out, progress=False)
    assert out.read_text(encoding="utf-8") == before
    assert plan_and_save(ds.root, out, overwrite=True, progress=False).batch_size == 32
    out.unlink()  # the fingerprint alone also blocks
    with pytest.raises(MedalloyError, match=r"fingerprint\.json: file already exists"):
        plan_and_save(ds.root, out, progress=False)
    with pytest.raises(MedalloyError, match="cannot be named fingerprint.json"):
        plan_and_save(ds.root, tmp_path / "x" / "fingerprint.json", progress=False)


def test_planning_errors(tmp_path):
    ds = grey_2d(tmp_path)
    fp = fingerprint(ds, progress=False)
    with pytest.raises(MedalloyError, match="cannot make a 3D plan for 2D images"):
        plan_dataset(ds, fp, force_dim=3)
    with pytest.raises(MedalloyError, match="force_dim must be 2, 3 or None"):
        plan_dataset(ds, fp, force_dim=4)
    with pytest.raises(MedalloyError, match="batch_2d must be >= 1"):
        plan_dataset(ds, fp, batch_2d=0)
    with pytest.raises(MedalloyError, match="fingerprint is of dataset 'Other'"):
        plan_dataset(ds, {**fp, "dataset": "Other"})
    with pytest.raises(MedalloyError, match="fingerprint lacks intensity"):
        plan_dataset(ds, {k: v for k, v in fp.items() if k != "intensity"})


def test_undeclared_label_value_is_an_error(tmp_path):
    ds = grey_2d(tmp_path)
    spec = json.loads((ds.root / "dataset.json").read_text(encoding="utf-8"))
    spec["labels"] = {"background": 0, "a": 1}  # the maps also hold 2
    (ds.root / "dataset.json").write_text(json.dumps(spec), encoding="utf-8")
    ds = RawDataset(ds.root)
    with pytest.raises(MedalloyError, match=r"dataset\.json: label maps hold values \[2\] not declared"):
        plan_of(ds)


# -- real data -------------------------------------------------------------------------------------
@pytest.mark.realdata
def test_real_datasets(shared_data):
    def plan(name):
        ds = RawDataset(shared_data / name)
        return plan_dataset(ds, fingerprint(ds, max_cases=40, progress=False))

    jsrt = plan("Dataset102_JSRT")
    assert (jsrt.dim, jsrt.patch_size, jsrt.target_spacing) == (2, [224, 224], [1.0, 1.0])
    shenzhen = plan("Dataset103_Shenzhen")
    assert (shenzhen.dim, shenzhen.target_spacing, shenzhen.patch_size) == (2, [2.0, 2.0], [256, 256])
    acdc = plan("Dataset104_ACDC")
    assert (acdc.dim, acdc.slice_axis, acdc.label_values) == (2, 2, [0, 1, 2, 3])
    assert all(p % 32 == 0 for p in acdc.patch_size)
    hippo = plan("Dataset105_Hippocampus")
    assert (hippo.dim, hippo.slice_axis, hippo.batch_size) == (3, None, 2)
    assert int(np.prod(hippo.patch_size)) <= 64**3


def test_network_plan_with_too_few_stages_is_rejected():
    from pydantic import ValidationError

    from medalloy.planning.plan import NetworkPlan

    with pytest.raises(ValidationError, match="at least 3 stages"):
        NetworkPlan(kernels=[[3, 3], [3, 3]], strides=[[1, 1], [2, 2]], filters=[8, 16])


def test_tiny_images_still_get_a_valid_network(tmp_path):
    plan = plan_of(volumes(tmp_path, (6, 7, 5), (1.0, 1.0, 1.0)))
    assert len(plan.network.strides) >= 3
    assert forward_shape(plan)[2:] == tuple(plan.patch_size)


@pytest.mark.parametrize("architecture", ["DynUNet", "nnUNet"])
def test_total_stride_is_per_axis_in_3d_as_plain_ints(architecture):
    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 1]]
    net = NetworkPlan(architecture=architecture, kernels=[[3, 3, 3]] * 4, strides=strides, filters=[8, 16, 32, 64])
    total = net.total_stride()
    assert total == [4, 8, 4] and all(type(t) is int for t in total)
