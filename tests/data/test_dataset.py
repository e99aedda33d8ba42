"""RawDataset: discovery of cases, channels and labels, medalloy's per-case extras, and every error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medalloy.data.dataset import RawDataset, make_dataset_json
from medalloy.data.io import write_image, write_label
from medalloy.errors import MedalloyError


def _write(root: Path, cases: dict[str, int], labelled: set[str], extras: dict | None = None, test_cases: tuple[str, ...] = ()) -> None:
    """``cases``: case id -> number of channel files; labels only for ``labelled``."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for cid, n in cases.items():
        for c in range(n):
            write_image(root / "imagesTr" / f"{cid}_{c:04d}.nii.gz", np.full((1, 4, 4, 3), c + 1.0, np.float32))
        if cid in labelled:
            lab = np.zeros((4, 4, 3), int)
            lab[1, 1, 1] = 2
            write_label(root / "labelsTr" / f"{cid}.nii.gz", lab)
    for cid in test_cases:
        (root / "imagesTs").mkdir(exist_ok=True)
        write_image(root / "imagesTs" / f"{cid}_0000.nii.gz", np.zeros((1, 4, 4, 3), np.float32))
    spec = make_dataset_json({"0": "T1", "1": "T2"}, {"background": 0, "tumour": 2}, len(cases), ".nii.gz", "Toy", cases=extras, modality="MR")
    (root / "dataset.json").write_text(json.dumps(spec), encoding="utf-8")


def test_discovery_of_channels_cases_labels_and_extras(tmp_path):
    extras = {"b": {"source": "siteB", "patient": "P1", "age": 40}, "a": {"patient": "P1"}}
    _write(tmp_path, {"b": 2, "a": 2, "c": 2}, labelled={"a", "b"}, extras=extras)
    # files that are not cases are ignored
    (tmp_path / "imagesTr" / ".hidden_0000.nii.gz").write_bytes(b"x")
    (tmp_path / "imagesTr" / "notes.txt").write_text("x", encoding="utf-8")
    (tmp_path / "imagesTr" / "nochannel.nii.gz").write_bytes(b"x")
    ds = RawDataset(tmp_path)
    assert [c.case_id for c in ds.cases] == ["a", "b", "c"]
    a, b, c = ds.cases
    assert [p.name for p in a.images] == ["a_0000.nii.gz", "a_0001.nii.gz"]
    assert a.label == tmp_path / "labelsTr" / "a.nii.gz" and c.label is None
    assert [x.case_id for x in ds.labelled_cases()] == ["a", "b"]
    assert (a.source, a.patient, a.group) == ("default", "P1", "P1")
    assert (b.source, b.patient, b.extra) == ("siteB", "P1", {"age": 40})
    assert c.group == "c"
    assert ds.sources == ["default", "siteB"]
    assert ds.spec.num_channels == 2 and ds.spec.modality == "MR" and ds.name == "Toy"
    assert ds.spec.foreground_labels == {"tumour": 2}
    image, label, meta = ds.load("a")
    assert image.shape == (2, 4, 4, 3) and image[1].min() == 2.0
    assert label.shape == (4, 4, 3) and label.sum() == 2
    assert ds.load(c)[1] is None
    assert len(ds) == 3


def test_test_cases_are_discovered(tmp_path):
    _write(tmp_path, {"a": 2}, labelled={"a"}, test_cases=("t1", "t0"))
    ds = RawDataset(tmp_path)
    ts = ds.test_cases()
    assert [c.case_id for c in ts] == ["t0", "t1"] and all(c.label is None for c in ts)
    (tmp_path / "labelsTs").mkdir()
    write_label(tmp_path / "labelsTs" / "t1.nii.gz", np.zeros((4, 4, 3), int))
    assert [c.label is not None for c in ds.test_cases()] == [False, True]


def test_no_images_ts_gives_no_test_cases(tmp_path):
    _write(tmp_path, {"a": 2}, labelled={"a"})
    assert RawDataset(tmp_path).test_cases() == []


def _one_line(exc: pytest.ExceptionInfo, path: Path) -> None:
    assert "\n" not in str(exc.value) and str(path) in str(exc.value)


def test_missing_folder_and_missing_dataset_json(tmp_path):
    with pytest.raises(MedalloyError, match="dataset folder not found") as exc:
        RawDataset(tmp_path / "nope")
    _one_line(exc, tmp_path / "nope")
    with pytest.raises(MedalloyError, match="dataset.json not found") as exc:
        RawDataset(tmp_path)
    _one_line(exc, tmp_path / "dataset.json")


def test_bad_json(tmp_path):
    (tmp_path / "dataset.json").write_text('{"labels": {"background": 0,}', encoding="utf-8")
    with pytest.raises(MedalloyError, match="invalid JSON") as exc:
        RawDataset(tmp_path)
    _one_line(exc, tmp_path / "dataset.json")


def test_missing_required_field(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0}}), encoding="utf-8")
    with pytest.raises(MedalloyError, match="file_ending") as exc:
        RawDataset(tmp_path)
    _one_line(exc, tmp_path / "dataset.json")


def test_region_labels_rejected(tmp_path):
    spec = make_dataset_json({"0": "T1"}, {"background": 0, "whole": [1, 2]}, 1, ".nii.gz", "R")  # type: ignore[dict-item]
    (tmp_path / "dataset.json").write_text(json.dumps(spec), encoding="utf-8")
    (tmp_path / "imagesTr").mkdir()
    with pytest.raises(MedalloyError) as exc:
        RawDataset(tmp_path)
    assert "whole" in str(exc.value)
    _one_line(exc, tmp_path / "dataset.json")


def test_missing_images_tr(tmp_path):
    spec = make_dataset_json({"0": "T1"}, {"background": 0, "a": 1}, 1, ".nii.gz", "R")
    (tmp_path / "dataset.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(MedalloyError, match="no imagesTr/ folder") as exc:
        RawDataset(tmp_path)
    _one_line(exc, tmp_path)


def test_unknown_case_and_label_shape_mismatch(tmp_path):
    _write(tmp_path, {"a": 1}, labelled=set())
    write_label(tmp_path / "labelsTr" / "a.nii.gz", np.zeros((4, 4, 2), int))
    ds = RawDataset(tmp_path)
    with pytest.raises(MedalloyError, match="no case 'zz'"):
        ds.case("zz")
    with pytest.raises(MedalloyError, match="label shape") as exc:
        ds.load("a")
    _one_line(exc, tmp_path / "labelsTr" / "a.nii.gz")
