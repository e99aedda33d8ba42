"""Fingerprint: shapes/spacings, foreground intensity statistics, label statistics, sampling, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from planning_toys import ToyCase, write_dataset

from medalloy.errors import MedalloyError
from medalloy.planning.fingerprint import VOXELS_PER_CASE, fingerprint, load_fingerprint, save_fingerprint

LABELS = {"background": 0, "lung": 1, "heart": 2}


def _grey_cases(rng: np.random.Generator) -> dict[str, ToyCase]:
    """A: 20x24 with 24 px of label 1 and 48 px of label 2; B: 16x24 with 16 px of label 1; C: unlabelled."""
    a_lab = np.zeros((20, 24), np.uint8)
    a_lab[2:6, 3:9] = 1
    a_lab[10:12, :] = 2
    b_lab = np.zeros((16, 24), np.uint8)
    b_lab[:4, :4] = 1
    return {
        "a": ToyCase(rng.integers(0, 256, (1, 20, 24)).astype(np.uint8), a_lab, source="siteA"),
        "b": ToyCase(rng.integers(0, 256, (1, 16, 24)).astype(np.uint8), b_lab, source="siteB"),
        "c": ToyCase(rng.integers(0, 256, (1, 18, 24)).astype(np.uint8), None, source="siteA"),
    }


def test_grey_2d_statistics_match_numpy_on_foreground(tmp_path):
    cases = _grey_cases(np.random.default_rng(1))
    ds = write_dataset(tmp_path / "Dataset001_Grey", cases, {"0": "X-ray"}, LABELS, ".png", "Grey")
    fp = fingerprint(ds, progress=False)

    assert fp["dataset"] == "Grey" and fp["dim"] == 2 and fp["rgb"] is False
    assert fp["channel_names"] == ["X-ray"] and fp["num_channels"] == 1
    assert fp["case_ids"] == ["a", "b", "c"]
    assert fp["shapes"] == [[20, 24], [16, 24], [18, 24]]
    assert fp["spacings"] == [[1.0, 1.0]] * 3
    assert fp["median_shape"] == [18.0, 24.0] and fp["median_spacing"] == [1.0, 1.0]
    assert fp["num_cases"] == 3 and fp["num_labelled_cases"] == 2
    assert fp["cases_per_source"] == {"siteA": 2, "siteB": 1}

    # All 88 foreground pixels are below the per-case cap, so the statistics are exact.
    fg = np.concatenate([cases[k].image[0][cases[k].label > 0] for k in ("a", "b")]).astype(float)
    stat = fp["intensity"][0]
    assert fp["intensity_region"] == "foreground" and stat["num_voxels"] == 88 == fg.size
    assert stat["mean"] == pytest.approx(fg.mean()) and stat["std"] == pytest.approx(fg.std())
    assert stat["percentile_00_5"] == pytest.approx(np.percentile(fg, 0.5))
    assert stat["percentile_99_5"] == pytest.approx(np.percentile(fg, 99.5))
    assert (stat["min"], stat["max"]) == (fg.min(), fg.max())

    assert fp["label_values_found"] == [0, 1, 2]
    assert fp["labels"]["1"] == {"name": "lung", "voxel_fraction": pytest.approx((24 / 480 + 16 / 384) / 2), "num_cases": 2}
    assert fp["labels"]["2"] == {"name": "heart", "voxel_fraction": pytest.approx(48 / 480 / 2), "num_cases": 1}
    assert fp["labels"]["0"]["voxel_fraction"] == pytest.approx(((480 - 72) / 480 + (384 - 16) / 384) / 2)
    assert json.loads(json.dumps(fp)) == fp  # JSON-native: string keys, plain floats


def test_declared_but_absent_label_is_reported_with_zero_cases(tmp_path):
    cases = _grey_cases(np.random.default_rng(1))
    ds = write_dataset(tmp_path / "Dataset001_Grey", cases, {"0": "X-ray"}, {**LABELS, "tumour": 3}, ".png", "Grey")
    fp = fingerprint(ds, progress=False)
    assert fp["labels"]["3"] == {"name": "tumour", "voxel_fraction": 0.0, "num_cases": 0}
    assert 3 not in fp["label_values_found"]


def test_rgb_png_gives_three_channels_with_own_statistics(tmp_path):
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (3, 12, 10)).astype(np.uint8)
    label = np.zeros((12, 10), np.uint8)
    label[3:7, 2:5] = 1
    ds = write_dataset(tmp_path / "Dataset002_Rgb", {"p": ToyCase(image, label)}, {"0": "R", "1": "G", "2": "B"}, {"background": 0, "polyp": 1}, ".png", "Rgb")
    fp = fingerprint(ds, progress=False)
    assert fp["rgb"] is True and fp["num_channels"] == 3 and fp["channel_names"] == ["R", "G", "B"]
    for c in range(3):
        fg = image[c][label > 0].astype(float)
        assert fp["intensity"][c]["mean"] == pytest.approx(fg.mean())
        assert fp["intensity"][c]["percentile_99_5"] == pytest.approx(np.percentile(fg, 99.5))


def test_rgb_file_is_detected_even_when_named_as_one_channel(tmp_path):
    image = np.random.default_rng(3).integers(0, 256, (3, 8, 8)).astype(np.uint8)
    ds = write_dataset(
        tmp_path / "Dataset003_Photo", {"p": ToyCase(image, np.ones((8, 8), np.uint8))}, {"0": "photo"}, {"background": 0, "x": 1}, ".png", "Photo"
    )
    fp = fingerprint(ds, progress=False)
    assert fp["rgb"] is True and fp["channel_names"] == ["R", "G", "B"]


def _volume_cases() -> dict[str, ToyCase]:
    """Case 'big' has 27000 foreground voxels (above the cap), case 'small' 100."""
    rng = np.random.default_rng(4)
    small_lab = np.zeros((10, 10, 10), np.uint8)
    small_lab[:1] = 1
    return {
        "big": ToyCase(rng.random((1, 30, 30, 30), dtype=np.float32), np.ones((30, 30, 30), np.uint8), (1.0, 1.0, 1.0)),
        "small": ToyCase(rng.random((1, 10, 10, 10), dtype=np.float32) + 5.0, small_lab, (1.0, 1.0, 2.0)),
    }


def test_foreground_sampling_is_capped_per_case_and_seeded(tmp_path):
    cases = _volume_cases()
    ds = write_dataset(tmp_path / "Dataset004_Vol", cases, {"0": "MRI"}, {"background": 0, "fg": 1}, ".nii.gz", "Vol")
    fp0 = fingerprint(ds, seed=0, progress=False)
    assert fp0["dim"] == 3 and fp0["spacings"] == [[1.0, 1.0, 1.0], [1.0, 1.0, 2.0]]
    stat = fp0["intensity"][0]
    assert stat["num_voxels"] == VOXELS_PER_CASE + 100
    # The small case's 100 voxels (all in [5, 6)) are always kept; the big one is subsampled.
    assert stat["max"] >= 5.0 and stat["min"] < 0.01
    expected_mean = (0.5 * VOXELS_PER_CASE + 5.5 * 100) / (VOXELS_PER_CASE + 100)
    assert stat["mean"] == pytest.approx(expected_mean, abs=0.02)
    assert fingerprint(ds, seed=0, progress=False) == fp0
    assert fingerprint(ds, seed=1, progress=False)["intensity"][0]["mean"] != stat["mean"]


def test_max_cases_takes_a_seeded_subset(tmp_path):
    rng = np.random.default_rng(5)
    cases = {f"c{i}": ToyCase(rng.integers(0, 256, (1, 8, 8 + i)).astype(np.uint8), np.ones((8, 8 + i), np.uint8)) for i in range(5)}
    ds = write_dataset(tmp_path / "Dataset005_Many", cases, {"0": "X-ray"}, {"background": 0, "x": 1}, ".png", "Many")
    fp = fingerprint(ds, max_cases=2, seed=7, progress=False)
    assert fp["num_cases"] == 5 and fp["num_cases_fingerprinted"] == 2 and len(fp["shapes"]) == 2
    assert fp["case_ids"] == sorted(fp["case_ids"])
    assert fingerprint(ds, max_cases=2, seed=7, progress=False)["case_ids"] == fp["case_ids"]
    assert [s[1] - 8 for s in fp["shapes"]] == [int(c[1:]) for c in fp["case_ids"]]
    with pytest.raises(MedalloyError, match="max_cases must be >= 1"):
        fingerprint(ds, max_cases=0, progress=False)


def test_save_refuses_overwrite_and_round_trips(tmp_path):
    cases = _grey_cases(np.random.default_rng(1))
    fp = fingerprint(write_dataset(tmp_path / "Dataset001_Grey", cases, {"0": "X-ray"}, LABELS, ".png", "Grey"), progress=False)
    path = save_fingerprint(fp, tmp_path / "out" / "fingerprint.json")
    assert load_fingerprint(path) == fp
    with pytest.raises(MedalloyError, match="already exists"):
        save_fingerprint(fp, path)
    save_fingerprint({**fp, "seed": 3}, path, overwrite=True)
    assert load_fingerprint(path)["seed"] == 3
    with pytest.raises(MedalloyError, match="fingerprint not found"):
        load_fingerprint(tmp_path / "missing.json")


def test_empty_dataset_is_an_error(tmp_path):
    ds = write_dataset(tmp_path / "Dataset006_Empty", {}, {"0": "MRI"}, {"background": 0}, ".nii.gz", "Empty")
    with pytest.raises(MedalloyError, match="no training cases"):
        fingerprint(ds, progress=False)


def test_mixed_2d_and_3d_cases_are_an_error(tmp_path):
    cases = {
        "a": ToyCase(np.zeros((1, 8, 8, 4), np.float32), np.zeros((8, 8, 4), np.uint8), (1.0, 1.0, 1.0)),
        "b": ToyCase(np.zeros((1, 8, 8), np.float32), np.zeros((8, 8), np.uint8), (1.0, 1.0)),
    }
    ds = write_dataset(tmp_path / "Dataset007_Mixed", cases, {"0": "MRI"}, {"background": 0}, ".nii.gz", "Mixed")
    with pytest.raises(MedalloyError, match=r"b_0000\.nii\.gz: case has 2 spatial axes but earlier cases have 3"):
        fingerprint(ds, progress=False)


def test_channel_names_must_match_the_images(tmp_path):
    cases = {"a": ToyCase(np.zeros((2, 6, 6, 6), np.float32), np.zeros((6, 6, 6), np.uint8), (1.0, 1.0, 1.0))}
    ds = write_dataset(tmp_path / "Dataset008_Chan", cases, {"0": "T1"}, {"background": 0}, ".nii.gz", "Chan")
    with pytest.raises(MedalloyError, match=r"dataset\.json: dataset\.json names 1 channels but the images have 2"):
        fingerprint(ds, progress=False)


def test_non_positive_spacing_is_an_error(tmp_path, monkeypatch):
    cases = {"a": ToyCase(np.zeros((1, 6, 6, 6), np.float32), np.zeros((6, 6, 6), np.uint8), (1.0, 1.0, 1.0))}
    ds = write_dataset(tmp_path / "Dataset009_Zero", cases, {"0": "MRI"}, {"background": 0}, ".nii.gz", "Zero")
    # nibabel repairs zero pixdims on load, so a broken header (e.g. from DICOM) is simulated.
    load = ds.load

    def broken_load(case):
        image, label, meta = load(case)
        meta.spacing = (1.0, 1.0, 0.0)
        return image, label, meta

    monkeypatch.setattr(ds, "load", broken_load)
    with pytest.raises(MedalloyError, match=r"a_0000\.nii\.gz: voxel spacing \(1\.0, 1\.0, 0\.0\) is not positive"):
        fingerprint(ds, progress=False)


def test_without_any_foreground_all_voxels_are_used(tmp_path):
    image = np.arange(36, dtype=np.uint8).reshape(1, 6, 6)
    ds = write_dataset(tmp_path / "Dataset010_Bg", {"a": ToyCase(image, np.zeros((6, 6), np.uint8))}, {"0": "X-ray"}, {"background": 0, "x": 1}, ".png", "Bg")
    fp = fingerprint(ds, progress=False)
    assert fp["intensity_region"] == "all"
    assert fp["intensity"][0]["num_voxels"] == 36 and fp["intensity"][0]["mean"] == pytest.approx(17.5)
    assert fp["labels"]["1"]["num_cases"] == 0 and fp["label_values_found"] == [0]
