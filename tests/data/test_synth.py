"""Tests of the synthetic multi-site collection (medalloy.data.synth)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from medalloy.data.dataset import RawDataset
from medalloy.data.io import read_image, read_label
from medalloy.data.synth import COLLECTION, generate_collection, generate_dataset, get_dataset, render_case, write_preview
from medalloy.errors import MedalloyError

N_TRAIN, N_TEST = 4, 1


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("synth")
    paths = generate_collection(out, seed=0, cases_per_source=N_TRAIN, test_cases_per_source=N_TEST, progress=False)
    return {p.name: p for p in paths}


def _by_source(raw: RawDataset) -> dict[str, list]:
    groups: dict[str, list] = {}
    for case in raw.cases:
        groups.setdefault(case.source, []).append(raw.load(case))
    return groups


def test_collection_layout_and_dataset_json(collection):
    assert sorted(collection) == ["Dataset901_SynthMR", "Dataset902_SynthCXR", "Dataset903_SynthCXRLung", "Dataset904_SynthEndo"]
    expected = {"Dataset901_SynthMR": ("MR", ".nii.gz"), "Dataset902_SynthCXR": ("XR", ".png"),
                "Dataset903_SynthCXRLung": ("XR", ".png"), "Dataset904_SynthEndo": ("endoscopy", ".png")}  # fmt: skip
    for name, root in collection.items():
        raw = RawDataset(root)
        info = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
        assert (info["medalloy"]["modality"], info["file_ending"]) == expected[name]
        assert info["numTraining"] == 2 * N_TRAIN == len(raw.cases)
        assert len(raw.test_cases()) == 2 * N_TEST and all(c.label is not None for c in raw.test_cases())
        assert all(c.label is not None for c in raw.cases)
        sources = sorted(COLLECTION[name].sites)
        assert raw.sources == sources
        assert sorted({c.source for c in raw.test_cases()}) == sources
        assert all(len([c for c in raw.cases if c.source == s]) == N_TRAIN for s in sources)


def test_mr_patients_hold_two_scans_and_never_cross_splits(collection):
    raw = RawDataset(collection["Dataset901_SynthMR"])
    train_patients = [c.patient for c in raw.cases]
    assert all(p is not None for p in train_patients)
    counts = {p: train_patients.count(p) for p in set(train_patients)}
    assert sorted(counts.values()) == [2] * (len(train_patients) // 2)
    assert not set(train_patients) & {c.patient for c in raw.test_cases()}
    # the two scans of a patient share the anatomy: organ volumes within 15 %, unlike two patients'
    organ = {c.case_id: (raw.load(c)[1] > 0).sum() for c in raw.cases if c.source == "siteA"}
    assert abs(organ["siteA_tr000"] / organ["siteA_tr001"] - 1) < 0.15
    assert raw.case("siteA_tr000").patient == raw.case("siteA_tr001").patient != raw.case("siteA_tr002").patient


def test_labels_within_label_map_and_present_in_most_cases(collection):
    for name, root in collection.items():
        raw = RawDataset(root)
        allowed = set(raw.spec.labels.values())
        cases = raw.cases + raw.test_cases()
        present = {v: 0 for v in raw.spec.foreground_labels.values()}
        for case in cases:
            _, label, _ = raw.load(case)
            values = set(np.unique(label).tolist())
            assert values <= allowed, (name, case.case_id, values)
            for v in present:
                present[v] += v in values
        assert all(n >= 0.8 * len(cases) for n in present.values()), (name, present)


def test_dataset_903_is_lung_only(collection):
    raw = RawDataset(collection["Dataset903_SynthCXRLung"])
    assert raw.spec.labels == {"background": 0, "lung": 1}
    for case in raw.cases + raw.test_cases():
        assert read_label(case.label)[0].max() == 1


def test_label_sizes_fit_their_anatomy(collection):
    raw = RawDataset(collection["Dataset904_SynthEndo"])
    for case in raw.cases:
        frac = (raw.load(case)[1] == 1).mean()
        assert 0.03 <= frac <= 0.15, (case.case_id, frac)
    raw = RawDataset(collection["Dataset902_SynthCXR"])
    for case in raw.cases:
        label = raw.load(case)[1]
        lung, heart = (label == 1).mean(), (label == 2).mean()
        assert 0.1 < lung < 0.4 and 0.03 < heart < 0.12 and heart < lung, (case.case_id, lung, heart)
        # the heart sits between the lungs: its centre column lies between the two lung halves' centres
        cols = np.nonzero(label == 2)[1].mean() / label.shape[1]
        assert 0.35 < cols < 0.75
    raw = RawDataset(collection["Dataset901_SynthMR"])
    for case in raw.cases:
        label = raw.load(case)[1]
        # the core is surrounded by organ: a one-voxel dilation of the core stays inside the organ
        assert np.all(label[ndimage.binary_dilation(label == 2)] >= 1), case.case_id
        core_share = (label == 2).sum() / (label >= 1).sum()
        assert 0.03 < core_share < 0.3, (case.case_id, core_share)


def test_geometry_mr_spacing_and_rgb_channels(collection):
    raw = RawDataset(collection["Dataset901_SynthMR"])
    a = raw.load("siteA_tr000")
    b = raw.load("siteB_tr000")
    assert a[2].spacing == (1.0, 1.0, 1.0) and a[0].shape == (1, 40, 48, 32)
    assert b[2].spacing == (1.0, 1.0, 2.0) and b[0].shape == (1, 40, 48, 16) and b[1].shape == (40, 48, 16)
    # a thick slice is centred between the two fine slices it averages: world z of slice 0
    assert np.asarray(a[2].affine)[2, 3] == -15.5 and np.asarray(b[2].affine)[2, 3] == -15.0
    assert np.allclose(np.asarray(b[2].affine) @ [0, 0, 1, 1], [-19.5, -23.5, -13.0, 1])
    assert np.asarray(read_image(raw.case("siteB_tr000").images)[0]).dtype == np.float32

    raw = RawDataset(collection["Dataset904_SynthEndo"])
    assert raw.spec.is_rgb and raw.spec.channel_names == {"0": "R", "1": "G", "2": "B"}
    assert all(len(c.images) == 1 for c in raw.cases)
    assert raw.load("siteA_tr000")[0].shape == (3, 128, 128)
    assert raw.load("siteB_tr000")[0].shape == (3, 96, 96)
    assert RawDataset(collection["Dataset902_SynthCXR"]).load("siteB_tr000")[0].shape == (1, 128, 128)
    assert RawDataset(collection["Dataset903_SynthCXRLung"]).load("siteD_tr000")[0].shape == (1, 112, 112)


def test_sources_differ_measurably(collection):
    mr = _by_source(RawDataset(collection["Dataset901_SynthMR"]))
    # noise in the air of the volume's corners (outside the body ellipse): siteB has 5x sigma
    corner = {s: np.mean([img[0, :4, :4].std() for img, _, _ in cases]) for s, cases in mr.items()}
    assert corner["siteB"] > 2.5 * corner["siteA"]
    organ = {s: np.median([np.median(img[0][lab == 1]) for img, lab, _ in cases]) for s, cases in mr.items()}
    assert organ["siteB"] > 1.5 * organ["siteA"]

    cxr = _by_source(RawDataset(collection["Dataset902_SynthCXR"]))
    lung_mean = {s: np.mean([img[0][lab == 1].mean() for img, lab, _ in cases]) for s, cases in cxr.items()}
    assert lung_mean["siteB"] - lung_mean["siteA"] > 20  # grey levels: siteB is washed out

    lung_only = _by_source(RawDataset(collection["Dataset903_SynthCXRLung"]))
    contrast = {s: np.mean([img[0][lab == 0].mean() - img[0][lab == 1].mean() for img, lab, _ in cases]) for s, cases in lung_only.items()}
    assert contrast["siteC"] > 1.5 * contrast["siteD"]

    endo = _by_source(RawDataset(collection["Dataset904_SynthEndo"]))
    red_green = {s: np.mean([img[0].mean() / img[1].mean() for img, _, _ in cases]) for s, cases in endo.items()}
    assert red_green["siteB"] > 1.2 * red_green["siteA"]


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    for name in ("Dataset901_SynthMR", "Dataset904_SynthEndo"):
        a = generate_dataset(name, tmp_path / "a", seed=3, cases_per_source=1, test_cases_per_source=1, progress=False)
        b = generate_dataset(name, tmp_path / "b", seed=3, cases_per_source=1, test_cases_per_source=1, progress=False)
        c = generate_dataset(name, tmp_path / "c", seed=4, cases_per_source=1, test_cases_per_source=1, progress=False)
        labels = sorted(p.relative_to(a) for p in a.glob("labels*/*"))
        assert len(labels) == 4
        for rel in labels:
            assert (a / rel).read_bytes() == (b / rel).read_bytes()
            assert not np.array_equal(read_label(a / rel)[0], read_label(c / rel)[0])
        for rel in sorted(p.relative_to(a) for p in a.glob("images*/*")):
            assert np.array_equal(read_image(a / rel)[0], read_image(b / rel)[0])
            assert not np.array_equal(read_image(a / rel)[0], read_image(c / rel)[0])
        assert (a / "dataset.json").read_text(encoding="utf-8") == (b / "dataset.json").read_text(encoding="utf-8")


def test_one_case_renders_alone_as_written(collection):
    raw = RawDataset(collection["Dataset901_SynthMR"])
    case = next(c for c in raw.test_cases() if c.case_id == "siteB_ts000")
    image, label, meta = render_case("901", "siteB", 0, seed=0, split="test")
    assert np.array_equal(read_image(case.images)[0], image.astype(np.float32))
    assert np.array_equal(read_label(case.label)[0], label)
    assert meta.spacing == (1.0, 1.0, 2.0)
    image, label, _ = render_case("SynthCXRLung", "siteC", 3, seed=0)
    raw = RawDataset(collection["Dataset903_SynthCXRLung"])
    assert np.array_equal(raw.load("siteC_tr003")[0], image.astype(np.float32))
    # the test split does not depend on how many training cases were made
    assert not np.array_equal(render_case(903, "siteC", 0, split="train")[1], render_case(903, "siteC", 0, split="test")[1])


def test_refuses_existing_folder_unless_overwrite(tmp_path):
    first = generate_dataset("902", tmp_path, cases_per_source=1, test_cases_per_source=0, progress=False)
    stale = first / "imagesTr" / "stale_0000.png"
    stale.write_bytes(b"old")
    with pytest.raises(MedalloyError) as err:
        generate_dataset("902", tmp_path, cases_per_source=1, test_cases_per_source=0, progress=False)
    msg = str(err.value)
    assert "\n" not in msg and str(first) in msg and "overwrite" in msg
    assert stale.exists()
    again = generate_dataset("902", tmp_path, seed=1, cases_per_source=1, test_cases_per_source=0, overwrite=True, progress=False)
    assert again == first and not stale.exists() and len(RawDataset(again).cases) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_collection_refuses_before_writing_anything(tmp_path):
    (tmp_path / "Dataset903_SynthCXRLung").mkdir()
    (tmp_path / "Dataset903_SynthCXRLung" / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(MedalloyError, match="Dataset903_SynthCXRLung"):
        generate_collection(tmp_path, cases_per_source=1, test_cases_per_source=0, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset903_SynthCXRLung"]
    # an existing empty folder is fine to fill
    (tmp_path / "Dataset903_SynthCXRLung" / "notes.txt").unlink()
    out = generate_dataset("903", tmp_path, cases_per_source=1, test_cases_per_source=0, progress=False)
    assert len(RawDataset(out).cases) == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [({"name": "Dataset999_Nope"}, "unknown synthetic dataset"), ({"seed": -1}, "seed"), ({"cases_per_source": 0}, "cases_per_source"),
     ({"test_cases_per_source": -1}, "test_cases_per_source"), ({"seed": 1.5}, "seed")],
)  # fmt: skip
def test_bad_arguments(tmp_path, kwargs, match):
    args = {"name": "902", "out": tmp_path, "progress": False, **kwargs}
    with pytest.raises(MedalloyError, match=match):
        generate_dataset(**args)
    assert not any(tmp_path.iterdir())


def test_render_case_rejects_unknown_source_and_split():
    with pytest.raises(MedalloyError, match="siteA, siteB"):
        render_case("902", "siteC", 0)
    with pytest.raises(MedalloyError, match="split"):
        render_case("902", "siteA", 0, split="val")
    with pytest.raises(MedalloyError, match="index"):
        render_case("902", "siteA", -1)
    assert get_dataset("synthendo").folder_name == "Dataset904_SynthEndo"


def test_write_preview(collection, tmp_path):
    png = write_preview(collection["Dataset902_SynthCXR"], tmp_path / "p.png", cases_per_source=2, tile=32)
    from PIL import Image

    with Image.open(png) as im:
        # 2 sources in rows (with a 2-pixel gap), 2 cases x (image, overlay) in columns
        assert im.size == (4 * 32, 2 * 32 + 2)
        rgb = np.asarray(im.convert("RGB"))
    assert (np.abs(rgb[..., 0].astype(int) - rgb[..., 2]) > 100).any()  # coloured contours drawn
    with pytest.raises(MedalloyError, match="exists"):
        write_preview(collection["Dataset902_SynthCXR"], png)
