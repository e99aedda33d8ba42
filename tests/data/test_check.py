"""Tests of check_dataset: a clean dataset passes, and each kind of problem is reported (all of them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medalloy.data.check import Problem, check_dataset, format_report
from medalloy.data.dataset import make_dataset_json
from medalloy.data.io import ImageMeta, write_image, write_label
from medalloy.jsonio import write_json_atomic

LABELS = {"background": 0, "a": 1, "b": 2}


def _image(rng: np.random.Generator, channels: int = 1, size: int = 8) -> np.ndarray:
    return rng.integers(0, 256, size=(channels, size, size)).astype(np.uint8)


def _label(rng: np.random.Generator, size: int = 8, top: int = 2) -> np.ndarray:
    return rng.integers(0, top + 1, size=(size, size)).astype(np.uint8)


def make_png(root: Path, n: int = 3, rgb: bool = False, channels: int = 1, **json_extra) -> Path:
    """A clean 2D dataset of ``n`` 8x8 cases named c0, c1, ..."""
    rng = np.random.default_rng(0)
    names = {"0": "R", "1": "G", "2": "B"} if rgb else {str(i): f"ch{i}" for i in range(channels)}
    for i in range(n):
        for c in range(1 if rgb else channels):
            write_image(root / "imagesTr" / f"c{i}_{c:04d}.png", _image(rng, 3 if rgb else 1))
        write_label(root / "labelsTr" / f"c{i}.png", _label(rng))
    write_json_atomic(root / "dataset.json", make_dataset_json(names, LABELS, n, ".png", "T", **json_extra))
    return root


def _nifti_meta(spacing=(1.0, 1.0, 1.0), shift: float = 0.0) -> ImageMeta:
    affine = np.diag(list(spacing) + [1.0])
    affine[:3, 3] = [10.0 + shift, -20.0, 30.0]
    return ImageMeta(kind="nifti", shape=(4, 4, 4), spacing=spacing, affine=affine.tolist())


def make_nifti(root: Path, n: int = 2, channels: int = 1) -> Path:
    """A clean 3D dataset of ``n`` 4x4x4 cases (spacing 0.7 x 0.7 x 2.5, a translated affine)."""
    rng = np.random.default_rng(1)
    meta = _nifti_meta((0.7, 0.7, 2.5))
    for i in range(n):
        for c in range(channels):
            write_image(root / "imagesTr" / f"c{i}_{c:04d}.nii.gz", rng.normal(size=(1, 4, 4, 4)).astype(np.float32), meta)
        write_label(root / "labelsTr" / f"c{i}.nii.gz", rng.integers(0, 3, size=(4, 4, 4)), meta)
    names = {str(c): f"MR{c}" for c in range(channels)}
    write_json_atomic(root / "dataset.json", make_dataset_json(names, LABELS, n, ".nii.gz", "T"))
    return root


def _edit_json(root: Path, **changes) -> None:
    data = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    (root / "dataset.json").write_text(json.dumps(data), encoding="utf-8")


def _only(problems: list[Problem], path: Path, *words: str) -> Problem:
    """Exactly one problem, about ``path``, whose message holds every word."""
    assert len(problems) == 1, [str(p) for p in problems]
    p = problems[0]
    assert Path(p.path) == path, str(p)
    for w in words:
        assert w in p.message, str(p)
    assert p.fix
    return p


# -- clean datasets ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["grey", "rgb", "two-channel", "nifti", "nifti-two-channel"])
def test_clean_dataset_has_no_problem(tmp_path: Path, kind: str) -> None:
    if kind.startswith("nifti"):
        root = make_nifti(tmp_path / "D", channels=2 if "two" in kind else 1)
    else:
        root = make_png(tmp_path / "D", rgb=kind == "rgb", channels=2 if kind == "two-channel" else 1)
    assert check_dataset(root, progress=False) == []


def test_problem_str_and_report(tmp_path: Path) -> None:
    p = Problem(Path("/d/x.png"), "it is broken", "fix it")
    assert str(p) == "/d/x.png: it is broken; fix it"
    root = make_png(tmp_path / "Dataset009_Tiny", n=3)
    assert format_report([], root) == "Dataset009_Tiny: 3 cases, 0 problems"
    report = format_report([p, p], root, num_cases=7).splitlines()
    assert report == [str(p), str(p), "Dataset009_Tiny: 7 cases, 2 problems"]


# -- dataset.json ----------------------------------------------------------------------------


def test_missing_dataset_json(tmp_path: Path) -> None:
    root = make_png(tmp_path / "D")
    (root / "dataset.json").unlink()
    _only(check_dataset(root, progress=False), root / "dataset.json", "not found")


def test_invalid_json(tmp_path: Path) -> None:
    root = make_png(tmp_path / "D")
    (root / "dataset.json").write_text('{"labels": {"a": 1},\n "x": }', encoding="utf-8")
    _only(check_dataset(root, progress=False), root / "dataset.json", "invalid JSON", "line 2")


@pytest.mark.parametrize("field", ["channel_names", "labels", "file_ending"])
def test_missing_required_field(tmp_path: Path, field: str) -> None:
    root = make_png(tmp_path / "D")
    _edit_json(root, **{field: None})
    _only(check_dataset(root, progress=False), root / "dataset.json", f"'{field}'", "missing")


def test_all_missing_fields_reported(tmp_path: Path) -> None:
    root = make_png(tmp_path / "D")
    _edit_json(root, channel_names=None, labels=None)
    messages = [p.message for p in check_dataset(root, progress=False)]
    assert len(messages) == 2 and "'channel_names'" in messages[0] and "'labels'" in messages[1]


@pytest.mark.parametrize(
    ("labels", "words"),
    [
        ({"background": 0, "a": 1, "both": [1, 2]}, ["'both'", "region"]),
        ({"background": 0, "a": 1.5}, ["'a'", "non-integer", "1.5"]),
        ({"background": 0, "a": "1"}, ["'a'", "non-integer"]),
        ({"background": 0, "a": 1, "b": 1}, ["[1]", "more than one name"]),
        ({"a": 1, "b": 2}, ["value 0"]),
        ({"background": 0, "a": 1, "b": 3}, ["[0, 1, 3]", "consecutive"]),
    ],
)
def test_bad_label_values(tmp_path: Path, labels: dict, words: list[str]) -> None:
    root = make_png(tmp_path / "D")
    _edit_json(root, labels=labels)
    problems = check_dataset(root, progress=False)
    _only([p for p in problems if p.path == root / "dataset.json"], root / "dataset.json", *words)


def test_folders_are_checked_despite_a_region_label(tmp_path: Path) -> None:
    """A region label is reported, and the folder problems still are; label files are not judged."""
    root = make_png(tmp_path / "D", n=3)
    _edit_json(root, labels={"background": 0, "a": 1, "both": [1, 2]})
    (root / "labelsTr" / "c1.png").unlink()
    got = sorted((Path(p.path).name, p.message) for p in check_dataset(root, progress=False))
    assert got == [("c1.png", "case 'c1' has no label file"), ("dataset.json", "label 'both' is a region ([1, 2])")]


def test_num_training_mismatch(tmp_path: Path) -> None:
    root = make_png(tmp_path / "D", n=3)
    _edit_json(root, numTraining=5)
    _only(check_dataset(root, progress=False), root / "dataset.json", "numTraining is 5", "3 cases")


def test_listed_case_that_does_not_exist(tmp_path: Path) -> None:
    root = make_png(tmp_path / "D", cases={"c0": {"source": "A"}, "ghost": {"source": "B"}})
    _only(check_dataset(root, progress=False), root / "dataset.json", "ghost", "do not exist")


# -- layout ----------------------------------------------------------------------------------


def test_no_images_tr(tmp_path: Path) -> None:
    root = make_png(tmp_path / "D")
    for p in (root / "imagesTr").iterdir():
        p.unlink()
    (root / "imagesTr").rmdir()
    _only(check_dataset(root, progress=False), root / "imagesTr", "no imagesTr")


def test_missing_channel_file(tmp_path: Path) -> None:
    root = make_png(tmp_path / "D", channels=2)
    (root / "imagesTr" / "c1_0001.png").unlink()
    _only(check_dataset(root, progress=False), root / "imagesTr" / "c1_0001.png", "'c1'", "channel file 1")


def test_extra_channel_file(tmp_path: Path) -> None:
    root = make_png(tmp_path / "D", rgb=True)
    write_image(root / "imagesTr" / "c0_0001.png", np.full((1, 8, 8), 5, np.uint8) + np.eye(8, dtype=np.uint8))
    _only(check_dataset(root, progress=False), root / "imagesTr" / "c0_0001.png", "unexpected channel 1", "RGB")


def test_case_without_label_and_label_without_image(tmp_path: Path) -> None:
    root = make_png(tmp_path / "D", n=3)
    (root / "labelsTr" / "c1.png").unlink()
    (root / "imagesTr" / "c2_0000.png").unlink()
    _edit_json(root, numTraining=2)
    problems = check_dataset(root, progress=False)
    assert sorted((Path(p.path).name, p.message) for p in problems) == [
        ("c1.png", "case 'c1' has no label file"),
        ("c2.png", "label file has no image"),
    ]


def test_no_labels_tr_is_one_problem(tmp_path: Path) -> None:
    root = make_png(tmp_path / "D", n=3)
    for p in (root / "labelsTr").iterdir():
        p.unlink()
    (root / "labelsTr").rmdir()
    _only(check_dataset(root, progress=False), root / "labelsTr", "no labelsTr")


def test_misnamed_image_file(tmp_path: Path) -> None:
    root = make_png(tmp_path / "D", n=2)
    (root / "imagesTr" / "c1_0000.png").rename(root / "imagesTr" / "c1.png")
    (root / "labelsTr" / "c1.png").unlink()
    _edit_json(root, numTraining=1)
    _only(check_dataset(root, progress=False), root / "imagesTr" / "c1.png", "not named CASE_XXXX")


def test_duplicate_ids_differing_by_case(tmp_path: Path) -> None:
    root = make_png(tmp_path / "D", n=2)
    for sub, name in (("imagesTr", "C0_0000.png"), ("labelsTr", "C0.png")):
        src = root / sub / name.replace("C0", "c0")
        (root / sub / name).write_bytes(src.read_bytes())
    _edit_json(root, numTraining=3)
    _only(check_dataset(root, progress=False), root / "imagesTr", "['C0', 'c0']", "letter case")


def test_same_case_with_another_ending(tmp_path: Path) -> None:
    root = make_png(tmp_path / "D", n=2)
    Image.fromarray(np.full((8, 8), 9, np.uint8)).save(root / "imagesTr" / "c1_0000.jpg")
    _only(check_dataset(root, progress=False), root / "imagesTr" / "c1_0000.jpg", "duplicate of c1_0000.png")


def test_image_with_another_ending_alone(tmp_path: Path) -> None:
    root = make_png(tmp_path / "D", n=2)
    Image.fromarray(np.full((8, 8), 9, np.uint8)).save(root / "imagesTr" / "c7_0000.jpg")
    _only(check_dataset(root, progress=False), root / "imagesTr" / "c7_0000.jpg", "file ending differs", "'.png'")


# -- content ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("content", "words"), [(b"", ["empty", "0 bytes"]), (b"not a png at all", ["cannot read"])])
def test_empty_or_unreadable_file(tmp_path: Path, content: bytes, words: list[str]) -> None:
    root = make_png(tmp_path / "D")
    (root / "imagesTr" / "c2_0000.png").write_bytes(content)
    _only(check_dataset(root, progress=False), root / "imagesTr" / "c2_0000.png", *words)


def test_unreadable_label(tmp_path: Path) -> None:
    root = make_png(tmp_path / "D")
    (root / "labelsTr" / "c0.png").write_bytes(b"\x89PNG broken")
    _only(check_dataset(root, progress=False), root / "labelsTr" / "c0.png", "cannot read")


def test_shape_mismatch(tmp_path: Path) -> None:
    root = make_png(tmp_path / "D")
    write_label(root / "labelsTr" / "c1.png", np.zeros((8, 6), np.uint8))
    _only(check_dataset(root, progress=False), root / "labelsTr" / "c1.png", "(8, 6)", "(8, 8)")


def test_channel_shape_mismatch(tmp_path: Path) -> None:
    root = make_png(tmp_path / "D", channels=2)
    write_image(root / "imagesTr" / "c1_0001.png", np.arange(48, dtype=np.uint8).reshape(1, 8, 6))
    _only(check_dataset(root, progress=False), root / "imagesTr" / "c1_0001.png", "channel shape (8, 6)")


def test_rgb_declared_but_grey(tmp_path: Path) -> None:
    root = make_png(tmp_path / "D", rgb=True)
    write_image(root / "imagesTr" / "c1_0000.png", np.arange(64, dtype=np.uint8).reshape(1, 8, 8))
    _only(check_dataset(root, progress=False), root / "imagesTr" / "c1_0000.png", "1 channel(s)", "RGB")


def test_grey_declared_but_rgb(tmp_path: Path) -> None:
    root = make_png(tmp_path / "D")
    write_image(root / "imagesTr" / "c1_0000.png", np.arange(192, dtype=np.uint8).reshape(3, 8, 8))
    _only(check_dataset(root, progress=False), root / "imagesTr" / "c1_0000.png", "3 channel(s)", "1 channel per file")


def test_label_values_outside_labels(tmp_path: Path) -> None:
    root = make_png(tmp_path / "D")
    lab = np.zeros((8, 8), np.uint8)
    lab[0, :3] = [1, 5, 7]
    write_label(root / "labelsTr" / "c2.png", lab)
    _only(check_dataset(root, progress=False), root / "labelsTr" / "c2.png", "[5, 7]", "not in")


def test_constant_image(tmp_path: Path) -> None:
    root = make_png(tmp_path / "D")
    write_image(root / "imagesTr" / "c0_0000.png", np.full((1, 8, 8), 42, np.uint8))
    _only(check_dataset(root, progress=False), root / "imagesTr" / "c0_0000.png", "constant", "42")


def test_nan_in_image(tmp_path: Path) -> None:
    root = make_nifti(tmp_path / "D")
    img = np.random.default_rng(3).normal(size=(1, 4, 4, 4)).astype(np.float32)
    img[0, 1, 2, 3] = np.nan
    write_image(root / "imagesTr" / "c1_0000.nii.gz", img, _nifti_meta((0.7, 0.7, 2.5)))
    _only(check_dataset(root, progress=False), root / "imagesTr" / "c1_0000.nii.gz", "NaN or inf")


def test_label_spacing_mismatch(tmp_path: Path) -> None:
    root = make_nifti(tmp_path / "D")
    write_label(root / "labelsTr" / "c0.nii.gz", np.zeros((4, 4, 4), np.uint8), _nifti_meta((0.7, 0.7, 3.0)))
    _only(check_dataset(root, progress=False), root / "labelsTr" / "c0.nii.gz", "spacing (0.7, 0.7, 3.0)")


def test_label_affine_mismatch(tmp_path: Path) -> None:
    root = make_nifti(tmp_path / "D")
    write_label(root / "labelsTr" / "c0.nii.gz", np.zeros((4, 4, 4), np.uint8), _nifti_meta((0.7, 0.7, 2.5), shift=0.35))
    _only(check_dataset(root, progress=False), root / "labelsTr" / "c0.nii.gz", "affine")


def test_float_rounding_of_geometry_is_not_a_problem(tmp_path: Path) -> None:
    """A header written from spacing 0.7 + 1e-6 matches 0.7: float32 noise, not a mismatch."""
    root = make_nifti(tmp_path / "D")
    write_label(root / "labelsTr" / "c0.nii.gz", np.zeros((4, 4, 4), np.uint8), _nifti_meta((0.7 + 1e-6, 0.7, 2.5), shift=1e-5))
    assert check_dataset(root, progress=False) == []


def test_channel_spacing_mismatch(tmp_path: Path) -> None:
    root = make_nifti(tmp_path / "D", channels=2)
    img = np.random.default_rng(4).normal(size=(1, 4, 4, 4)).astype(np.float32)
    write_image(root / "imagesTr" / "c1_0001.nii.gz", img, _nifti_meta((0.8, 0.7, 2.5)))
    _only(check_dataset(root, progress=False), root / "imagesTr" / "c1_0001.nii.gz", "spacing", "c1_0000.nii.gz")


def test_every_problem_is_reported(tmp_path: Path) -> None:
    """Problems in several cases and in dataset.json all come back in one run."""
    root = make_png(tmp_path / "D", n=4)
    (root / "imagesTr" / "c0_0000.png").write_bytes(b"")
    write_image(root / "imagesTr" / "c1_0000.png", np.full((1, 8, 8), 3, np.uint8))
    write_label(root / "labelsTr" / "c2.png", np.full((8, 8), 9, np.uint8))
    (root / "labelsTr" / "c3.png").unlink()
    _edit_json(root, numTraining=10)
    got = sorted((Path(p.path).name, p.message.split(" ")[0]) for p in check_dataset(root, progress=False))
    assert got == [
        ("c0_0000.png", "file"),
        ("c1_0000.png", "image"),
        ("c2.png", "label"),
        ("c3.png", "case"),
        ("dataset.json", "numTraining"),
    ]


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["Dataset102_JSRT", "Dataset103_Shenzhen", "Dataset104_ACDC", "Dataset105_Hippocampus"])
def test_real_datasets_have_no_problem(shared_data: Path, name: str) -> None:
    root = shared_data / name
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    problems = check_dataset(root, progress=False)
    assert [str(p) for p in problems] == []
    n = json.loads((root / "dataset.json").read_text(encoding="utf-8"))["numTraining"]
    assert format_report(problems, root) == f"{name}: {n} cases, 0 problems"
