"""evaluate_folders on tiny PNG/NIfTI folders whose metrics are countable by hand, and each error path."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medalloy.data.dataset import make_dataset_json
from medalloy.data.io import ImageMeta, write_image, write_label
from medalloy.errors import MedalloyError
from medalloy.evaluation import _slice_index, evaluate_folders, markdown_table
from medalloy.jsonio import write_json_atomic

SHAPE = (16, 16)


def squares(a_cols: tuple[int, int] | None, b: bool = True) -> np.ndarray:
    """Class 1 as a 4x4 square in rows 2-5 (columns a_cols), class 2 as a 4x4 square at rows/cols 10-13."""
    lab = np.zeros(SHAPE, dtype=np.uint8)
    if a_cols is not None:
        lab[2:6, a_cols[0] : a_cols[1]] = 1
    if b:
        lab[10:14, 10:14] = 2
    return lab


# case: (ground truth, prediction). Hand values (tolerance 1 px):
#   c1: a shifted 1 col -> Dice 0.75, HD95 1, NSD 1;  b identical -> 1, 0, 1
#   c2: a identical -> 1, 0, 1;  b missing in prediction -> 0, diagonal 16*sqrt(2), 0
#   c3: a shifted 2 cols -> Dice 0.5, HD95 2, NSD 2/3;  b identical
CASES = {
    "c1": (squares((2, 6)), squares((3, 7))),
    "c2": (squares((2, 6)), squares((2, 6), b=False)),
    "c3": (squares((2, 6)), squares((4, 8))),
}
SOURCES = {"c1": "siteA", "c2": "siteA", "c3": "siteB"}
DIAG = 16 * math.sqrt(2)


@pytest.fixture
def png_dataset(tmp_path: Path) -> tuple[Path, Path]:
    """An RGB PNG nnU-Net dataset (labels a=1, b=2; two sources) and a folder of predictions."""
    root = tmp_path / "Dataset001_Toy"
    pred_dir = tmp_path / "pred"
    rng = np.random.default_rng(0)
    for cid, (gt, pred) in CASES.items():
        write_label(root / "labelsTr" / f"{cid}.png", gt)
        write_label(pred_dir / f"{cid}.png", pred)
        write_image(root / "imagesTr" / f"{cid}_0000.png", rng.integers(0, 255, (3,) + SHAPE).astype(np.uint8))
    spec = make_dataset_json(
        {"0": "R", "1": "G", "2": "B"},
        {"background": 0, "a": 1, "b": 2},
        len(CASES),
        ".png",
        "Toy",
        cases={cid: {"source": src} for cid, src in SOURCES.items()},
    )
    write_json_atomic(root / "dataset.json", spec)
    return root, pred_dir


def assert_valid_small_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size < 150_000
    with Image.open(path) as im:
        im.verify()


def test_png_dataset_values_files_and_overlays(png_dataset):
    root, pred_dir = png_dataset
    result = evaluate_folders(pred_dir, root / "labelsTr", dataset=root, progress=False)
    out = pred_dir / "evaluation"

    pc = result["per_case"]
    assert pc["c1"]["a"] == {"dice": pytest.approx(0.75), "hd95": pytest.approx(1.0), "nsd": pytest.approx(1.0)}
    assert pc["c2"]["b"] == {"dice": 0.0, "hd95": pytest.approx(DIAG), "nsd": 0.0}
    assert pc["c3"]["a"] == {"dice": pytest.approx(0.5), "hd95": pytest.approx(2.0), "nsd": pytest.approx(2 / 3)}
    assert pc["c3"]["b"] == {"dice": pytest.approx(1.0), "hd95": 0.0, "nsd": pytest.approx(1.0)}

    s = result["summary"]
    assert s["n_cases"] == 3
    assert s["classes"]["a"]["dice"]["mean"] == pytest.approx(0.75)
    assert s["classes"]["a"]["dice"]["std"] == pytest.approx(math.sqrt(0.125 / 3))
    assert s["classes"]["b"]["hd95"]["mean"] == pytest.approx(DIAG / 3)
    # per-case foreground means of Dice: 0.875, 0.5, 0.75
    assert s["mean"]["dice"]["mean"] == pytest.approx((0.875 + 0.5 + 0.75) / 3)
    assert s["per_source"]["siteA"]["n_cases"] == 2
    assert s["per_source"]["siteA"]["classes"]["a"]["dice"]["mean"] == pytest.approx(0.875)
    assert s["per_source"]["siteB"]["classes"]["a"]["nsd"]["mean"] == pytest.approx(2 / 3)
    assert result["sources"] == SOURCES
    assert result["labels"] == {"background": 0, "a": 1, "b": 2}

    # the file holds exactly what was returned
    assert json.loads((out / "summary.json").read_text(encoding="utf-8")) == json.loads(json.dumps(result))
    md = (out / "summary.md").read_text(encoding="utf-8")
    assert "| a | 0.750 ± 0.204 | 1.00 ± 0.82 | 0.889 ± 0.157 |" in md
    assert "siteA" in md and "siteB" in md  # one table per source

    # best c1 (0.875), median c3 (0.75), worst c2 (0.5)
    overlays = sorted(p.name for p in out.glob("overlay_*.png"))
    assert overlays == ["overlay_best_c1.png", "overlay_median_c3.png", "overlay_worst_c2.png"]
    for name in overlays:
        assert_valid_small_png(out / name)


def test_markdown_table_rows_and_full_summary(png_dataset):
    root, pred_dir = png_dataset
    result = evaluate_folders(pred_dir, root / "labelsTr", dataset=root, overlays=False, progress=False)
    table = markdown_table(result["summary"], ["b", "a"])
    lines = table.strip().splitlines()
    assert lines[0] == "| Label | Dice | HD95 | NSD |"
    assert [ln.split("|")[1].strip() for ln in lines[2:]] == ["b", "a", "**mean**"]
    assert lines[2].startswith("| b | 0.667 ± 0.471 |")
    assert markdown_table(result, ["b", "a"]) == table  # a whole summary.json works too
    assert "| 0.500 ± 0.000 |" in markdown_table(result["summary"]["per_source"]["siteB"], ["a"])
    assert not list((pred_dir / "evaluation").glob("overlay_*.png"))


def test_nifti_inferred_labels_spacing_and_blank_overlays(tmp_path):
    gt_dir, pred_dir, out = tmp_path / "gt", tmp_path / "pred", tmp_path / "out"
    meta = ImageMeta(kind="nifti", shape=(8, 8, 6), spacing=(1.0, 1.0, 2.5))
    gt = np.zeros((8, 8, 6), dtype=np.uint8)
    gt[2:6, 2:6, 1:5] = 1
    pred = np.zeros_like(gt)
    pred[2:6, 2:6, 2:6] = 1  # shifted one voxel (2.5 mm) along the last axis: Dice 48*2/128
    write_label(gt_dir / "v1.nii.gz", gt, meta)
    write_label(pred_dir / "v1.nii.gz", pred, meta)
    gt2 = gt.copy()
    gt2[0:2, 0:2, 0:2] = 2  # label 2 only in the second case's ground truth
    write_label(gt_dir / "v2.nii.gz", gt2, meta)
    write_label(pred_dir / "v2.nii.gz", gt, meta)

    result = evaluate_folders(pred_dir, gt_dir, out_dir=out, nsd_tolerance=2.5, progress=False)
    assert result["labels"] == {"background": 0, "label_1": 1, "label_2": 2}
    assert result["per_case"]["v1"]["label_1"] == {"dice": pytest.approx(0.75), "hd95": pytest.approx(2.5), "nsd": pytest.approx(1.0)}
    # label 2 absent from both maps of v1 -> both-empty convention; missed in v2 -> worst case
    assert result["per_case"]["v1"]["label_2"] == {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}
    diag = math.sqrt(8**2 + 8**2 + 15**2)
    assert result["per_case"]["v2"]["label_2"] == {"dice": 0.0, "hd95": pytest.approx(diag), "nsd": 0.0}
    assert result["sources"] == {"v1": "default", "v2": "default"}
    assert set(result["summary"]["per_source"]) == {"default"}
    assert "## Source" not in (out / "summary.md").read_text(encoding="utf-8")  # a single source gets no extra table
    names = sorted(p.name for p in out.glob("overlay_*.png"))
    assert names == ["overlay_best_v1.png", "overlay_median_v2.png", "overlay_worst_v2.png"]
    for name in names:
        assert_valid_small_png(out / name)


def test_grey_nifti_image_from_imagesTs(tmp_path):
    root = tmp_path / "Dataset002_Vol"
    (root / "imagesTr").mkdir(parents=True)
    meta = ImageMeta(kind="nifti", shape=(8, 8, 4), spacing=(1.0, 1.0, 1.0))
    lab = np.zeros((8, 8, 4), dtype=np.uint8)
    lab[2:5, 2:5, 1:3] = 1
    write_label(root / "labelsTs" / "t1.nii.gz", lab, meta)
    write_image(root / "imagesTs" / "t1_0000.nii.gz", np.random.default_rng(0).normal(size=(1, 8, 8, 4)).astype(np.float32), meta)
    write_label(tmp_path / "pred" / "t1.nii.gz", lab, meta)
    write_json_atomic(root / "dataset.json", make_dataset_json({"0": "CT"}, {"background": 0, "organ": 1}, 0, ".nii.gz", "Vol"))
    result = evaluate_folders(tmp_path / "pred", root / "labelsTs", dataset=root, progress=False)
    assert result["per_case"]["t1"]["organ"]["dice"] == pytest.approx(1.0)
    assert_valid_small_png(tmp_path / "pred" / "evaluation" / "overlay_best_t1.png")


def test_slice_with_most_ground_truth():
    gt = np.zeros((4, 4, 5), dtype=np.int64)
    gt[0, 0, 1] = 1
    gt[:2, :2, 3] = 2
    pred = np.zeros_like(gt)
    pred[:, :, 4] = 1
    assert _slice_index(gt, pred) == 3
    assert _slice_index(np.zeros_like(gt), pred) == 4  # no ground truth: prediction decides
    assert _slice_index(np.zeros_like(gt), np.zeros_like(gt)) == 2


def test_missing_prediction(png_dataset):
    root, pred_dir = png_dataset
    (pred_dir / "c2.png").unlink()
    with pytest.raises(MedalloyError, match="1 ground-truth case.*no prediction: c2.png") as exc:
        evaluate_folders(pred_dir, root / "labelsTr", dataset=root, progress=False)
    assert "\n" not in str(exc.value)
    assert not (pred_dir / "evaluation").exists()  # nothing written on failure


def test_prediction_without_ground_truth(png_dataset):
    root, pred_dir = png_dataset
    write_label(pred_dir / "zz.png", squares(None))
    with pytest.raises(MedalloyError, match="no ground truth.*zz.png"):
        evaluate_folders(pred_dir, root / "labelsTr", dataset=root, progress=False)


def test_shape_mismatch(png_dataset):
    root, pred_dir = png_dataset
    write_label(pred_dir / "c3.png", np.zeros((16, 15), dtype=np.uint8))
    with pytest.raises(MedalloyError, match=r"c3.png: prediction shape \(16, 15\) differs"):
        evaluate_folders(pred_dir, root / "labelsTr", dataset=root, progress=False)


def test_label_value_outside_map(png_dataset):
    root, pred_dir = png_dataset
    bad = squares((2, 6))
    bad[0, 0] = 7
    write_label(pred_dir / "c1.png", bad)
    with pytest.raises(MedalloyError, match=r"c1.png: prediction holds label value\(s\) \[7\]"):
        evaluate_folders(pred_dir, root / "labelsTr", dataset=root, progress=False)
    # an explicit label map without the dataset is checked the same way
    with pytest.raises(MedalloyError, match=r"\[7\]"):
        evaluate_folders(pred_dir, root / "labelsTr", labels={"background": 0, "a": 1, "b": 2}, progress=False)


def test_refuses_to_overwrite(png_dataset):
    root, pred_dir = png_dataset
    out = pred_dir / "evaluation"
    evaluate_folders(pred_dir, root / "labelsTr", dataset=root, progress=False)
    before = (out / "summary.json").read_text(encoding="utf-8")
    write_label(pred_dir / "c2.png", CASES["c2"][0])  # c2 now perfect: best c2, median c1, worst c3
    with pytest.raises(MedalloyError, match="already exist.*overwrite"):
        evaluate_folders(pred_dir, root / "labelsTr", dataset=root, progress=False)
    assert (out / "summary.json").read_text(encoding="utf-8") == before
    result = evaluate_folders(pred_dir, root / "labelsTr", dataset=root, progress=False, overwrite=True)
    assert result["per_case"]["c2"]["b"]["dice"] == pytest.approx(1.0)
    assert json.loads((out / "summary.json").read_text(encoding="utf-8"))["per_case"]["c2"]["b"]["dice"] == pytest.approx(1.0)
    # the previous run's overlays are replaced, not left beside the new ones
    assert sorted(p.name for p in out.glob("overlay_*.png")) == ["overlay_best_c2.png", "overlay_median_c1.png", "overlay_worst_c3.png"]


def test_explicit_labels_without_background_entry(png_dataset, tmp_path):
    root, pred_dir = png_dataset
    result = evaluate_folders(pred_dir, root / "labelsTr", out_dir=tmp_path / "ev", labels={"x": 1, "y": 2}, overlays=False, progress=False)
    assert set(result["per_case"]["c1"]) == {"x", "y"}
    assert result["per_case"]["c1"]["x"]["dice"] == pytest.approx(0.75)
    assert result["sources"]["c1"] == "default"  # no dataset, no sources
