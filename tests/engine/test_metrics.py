"""Metrics against hand-computed values: squares and cubes whose overlaps and boundaries are countable."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medalloy.engine.metrics import (
    balanced_accuracy,
    batch_dice,
    binary_metrics,
    caption_scores,
    case_metrics,
    image_diagonal,
    retrieval_recall,
    summarize,
)
from medalloy.errors import MedalloyError

LABELS = {"background": 0, "a": 1}


def square(shape=(10, 10), rows=(2, 6), cols=(2, 6), value=1) -> np.ndarray:
    out = np.zeros(shape, dtype=np.int64)
    out[rows[0] : rows[1], cols[0] : cols[1]] = value
    return out


def test_dice_of_overlapping_squares():
    # 4x4 squares shifted by one column: overlap 4x3 = 12 -> Dice = 2*12 / (16 + 16) = 0.75
    gt = square()
    pred = square(cols=(3, 7))
    m = case_metrics(pred, gt, LABELS)
    assert m["a"]["dice"] == pytest.approx(0.75)
    assert set(m) == {"a"}  # background is never scored


def test_hd95_and_nsd_of_shifted_square():
    # Shift by 2 columns. Boundary rings have 12 pixels; the gt ring's distances to the pred ring are
    # top/bottom rows [2, 1, 0, 0] each, left inner [2, 2], right inner [1, 1] (same the other way).
    # HD95 = 95th percentile of {0 x4, 1 x4, 2 x4} = 2; within tolerance 1: 8 of 12 -> NSD = 2/3.
    gt = square()
    pred = square(cols=(4, 8))
    m = case_metrics(pred, gt, LABELS, nsd_tolerance=1.0)["a"]
    assert m["dice"] == pytest.approx(0.5)
    assert m["hd95"] == pytest.approx(2.0)
    assert m["nsd"] == pytest.approx(2.0 / 3.0)
    # a tolerance of 2 pixels covers every boundary pixel
    assert case_metrics(pred, gt, LABELS, nsd_tolerance=2.0)["a"]["nsd"] == pytest.approx(1.0)


def test_anisotropic_spacing_scales_distances():
    gt = square()
    pred = square(cols=(4, 8))  # shift of 2 along axis 1
    m = case_metrics(pred, gt, LABELS, spacing=(0.5, 3.0), nsd_tolerance=3.0)["a"]
    assert m["hd95"] == pytest.approx(6.0)  # 2 pixels * 3.0 mm; axis 0 spacing must not matter
    assert m["nsd"] == pytest.approx(2.0 / 3.0)  # tolerance 3 mm = 1 pixel along axis 1
    assert m["dice"] == pytest.approx(0.5)  # overlap is spacing-free
    m_rows = case_metrics(pred, gt, LABELS, spacing=(3.0, 0.5))["a"]
    assert m_rows["hd95"] == pytest.approx(1.0)  # the same shift along the 0.5 mm axis


def test_3d_cube_shift():
    # 4x4x4 cubes shifted by 1 along axis 2: overlap 4*4*3 = 48 -> Dice 96/128 = 0.75; HD95 = 1 voxel = 2.5 mm
    gt = np.zeros((6, 6, 6), dtype=np.int64)
    gt[1:5, 1:5, 1:5] = 1
    pred = np.zeros_like(gt)
    pred[1:5, 1:5, 2:6] = 1
    m = case_metrics(pred, gt, LABELS, spacing=(1.0, 1.0, 2.5), nsd_tolerance=2.5)["a"]
    assert m["dice"] == pytest.approx(0.75)
    assert m["hd95"] == pytest.approx(2.5)
    assert m["nsd"] == pytest.approx(1.0)


def test_empty_conventions():
    shape, spacing = (8, 12), (2.0, 0.5)
    empty = np.zeros(shape, dtype=np.int64)
    full = square(shape)
    assert binary_metrics(empty, empty, spacing) == {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}
    diag = math.sqrt((8 * 2.0) ** 2 + (12 * 0.5) ** 2)
    assert image_diagonal(shape, spacing) == pytest.approx(diag)
    for pred, gt in ((empty, full), (full, empty)):
        m = binary_metrics(pred == 1, gt == 1, spacing)
        assert m["dice"] == 0.0 and m["nsd"] == 0.0
        assert m["hd95"] == pytest.approx(diag)


def test_multiclass_with_missing_class():
    labels = {"background": 0, "a": 1, "b": 2, "c": 3}
    gt = square((12, 12), (1, 5), (1, 5), 1)
    gt[7:11, 7:11] = 2
    pred = square((12, 12), (1, 5), (2, 6), 1)  # class a: Dice 0.75
    # class b missing from the prediction; class c in neither
    m = case_metrics(pred, gt, labels)
    assert set(m) == {"a", "b", "c"}
    assert m["a"]["dice"] == pytest.approx(0.75)
    assert m["b"] == {"dice": 0.0, "hd95": pytest.approx(math.sqrt(2) * 12), "nsd": 0.0}
    assert m["c"] == {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}


def test_case_metrics_errors():
    with pytest.raises(MedalloyError, match="shape"):
        case_metrics(np.zeros((4, 4), int), np.zeros((4, 5), int), LABELS)
    with pytest.raises(MedalloyError, match="spacing"):
        case_metrics(np.zeros((4, 4), int), np.zeros((4, 4), int), LABELS, spacing=(1.0, 1.0, 1.0))


def test_case_metrics_computes_distances_once_per_class_present_in_both(monkeypatch):
    # Counted, not timed (CI machines are loaded): MONAI's surface distances, the costly part, run
    # once per class present in both masks, never for a class empty in one of them (its value is fixed).
    from medalloy.engine import metrics as metrics_module

    rng = np.random.default_rng(0)
    gt = np.zeros((64, 64, 6), dtype=np.int64)
    gt[10:40, 15:45, 1:5] = 1
    gt[42:60, 5:25, 2:4] = 2
    pred = np.roll(gt, 3, axis=0)
    pred[rng.random(gt.shape) < 0.001] = 2  # scattered false positives make ragged surfaces
    gt[0:4, 60:64, 0:2] = 3  # class c: in the ground truth only
    calls: list[tuple[int, int]] = []
    inner = metrics_module._monai_binary_metrics

    def counting(p, g, spacing, tol):
        calls.append((int(p.sum()), int(g.sum())))
        return inner(p, g, spacing, tol)

    monkeypatch.setattr(metrics_module, "_monai_binary_metrics", counting)
    labels = {"background": 0, "a": 1, "b": 2, "c": 3}
    m = case_metrics(pred, gt, labels, spacing=(0.8, 0.8, 3.0))
    assert calls == [(int((pred == 1).sum()), int((gt == 1).sum())), (int((pred == 2).sum()), int((gt == 2).sum()))]
    assert 0.8 < m["a"]["dice"] < 1.0 and m["c"] == {"dice": 0.0, "hd95": image_diagonal(gt.shape, (0.8, 0.8, 3.0)), "nsd": 0.0}


def test_batch_dice_hand_values():
    # item 0: class 1 pred 4 px, gt 4 px, overlap 2; item 1: class 1 pred 2 px, gt 0.
    # pooled class 1: 2*2 / (6 + 4) = 0.4; class 2 absent everywhere -> 1; class 3: pred 1 px, gt 1 px,
    # no overlap -> 0.
    pred = torch.zeros(2, 4, 4, dtype=torch.long)
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    pred[0, 0, 0:4] = 1
    target[0, 0, 2:4] = 1
    target[0, 1, 0:2] = 1
    pred[1, 3, 0:2] = 1
    pred[1, 2, 2] = 3
    target[1, 2, 3] = 3
    d = batch_dice(pred, target, num_classes=4)
    assert d.shape == (3,)
    assert torch.allclose(d, torch.tensor([0.4, 1.0, 0.0]))
    # scores (B, C, *spatial) and MONAI-style targets (B, 1, *spatial) give the same numbers
    scores = torch.nn.functional.one_hot(pred, 4).movedim(-1, 1).float()
    assert torch.allclose(batch_dice(scores, target[:, None], num_classes=4), d)


def test_batch_dice_out_of_range():
    with pytest.raises(MedalloyError, match="outside"):
        batch_dice(torch.full((1, 2, 2), 3), torch.zeros(1, 2, 2, dtype=torch.long), num_classes=3)


def test_summarize_per_class_mean_and_sources():
    per_case = {
        "c1": {"a": {"dice": 0.8, "hd95": 2.0, "nsd": 0.9}, "b": {"dice": 0.4, "hd95": 6.0, "nsd": 0.5}},
        "c2": {"a": {"dice": 0.6, "hd95": 4.0, "nsd": 0.7}, "b": {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}},
        "c3": {"a": {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}, "b": {"dice": 0.0, "hd95": 9.0, "nsd": 0.0}},
    }
    s = summarize(per_case, {"c1": "x", "c2": "x", "c3": "y"})
    assert s["n_cases"] == 3
    a = s["classes"]["a"]["dice"]
    assert a["mean"] == pytest.approx(0.8) and a["n"] == 3
    assert a["std"] == pytest.approx(math.sqrt((0.0 + 0.04 + 0.04) / 3))  # population std
    # case means of Dice: 0.6, 0.8, 0.5 -> mean 19/30
    assert s["mean"]["dice"]["mean"] == pytest.approx(1.9 / 3)
    assert s["mean"]["hd95"]["mean"] == pytest.approx((4.0 + 2.0 + 4.5) / 3)
    assert set(s["per_source"]) == {"x", "y"}
    x = s["per_source"]["x"]
    assert x["n_cases"] == 2
    assert x["classes"]["b"]["dice"]["mean"] == pytest.approx(0.7)
    assert s["per_source"]["y"]["classes"]["b"]["hd95"] == {"mean": 9.0, "std": 0.0, "n": 1}
    assert "per_source" not in summarize(per_case)


def test_summarize_skips_nan():
    per_case = {"c1": {"a": {"dice": float("nan"), "hd95": 1.0, "nsd": 1.0}}, "c2": {"a": {"dice": 0.5, "hd95": 3.0, "nsd": 1.0}}}
    s = summarize(per_case)
    assert s["classes"]["a"]["dice"] == {"mean": 0.5, "std": 0.0, "n": 1}
    assert s["classes"]["a"]["hd95"]["mean"] == pytest.approx(2.0)


def test_retrieval_recall_by_hand():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    txt = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.9]])
    # image 0 ranks texts 1, 2, 0; image 1: 0, 2, 1; image 2: 2 first -> R@1 = R@2 = 1/3, R@3 = 1
    r = retrieval_recall(img, txt, ks=(1, 2, 3))
    assert r == pytest.approx({"r1": 1 / 3, "r2": 1 / 3, "r3": 1.0})
    # texts 0 and 1 say the same thing: image 0's top text (1) now counts
    r = retrieval_recall(img, txt, keys=["same", "same", "other"], ks=(1,))
    assert r["r1"] == pytest.approx(1.0)


def test_balanced_accuracy_is_chance_for_a_constant_answer():
    majority = np.array(["a"] * 20)
    truth = np.array(["a"] * 15 + ["b"] * 5)
    assert balanced_accuracy(majority, truth) == pytest.approx(0.5)  # 75 % accuracy, chance-level balanced


def test_caption_scores():
    refs = ["small left pleural effusion.", "no acute cardiopulmonary abnormality.", "cardiomegaly."]
    perfect = caption_scores(refs, refs)
    assert perfect["bleu4"] == pytest.approx(1.0) and perfect["rougeL"] == pytest.approx(1.0)
    off = caption_scores(["right pleural effusion.", "no acute abnormality.", "cardiomegaly."], refs)
    assert 0 < off["bleu4"] < 1 and 0 < off["rougeL"] < 1
    # ROUGE-L F1 by hand (rouge-score drops punctuation): LCS "pleural effusion" = 2 of 3 and of 4 tokens
    p, r = 2 / 3, 2 / 4
    assert caption_scores(["right pleural effusion."], ["small left pleural effusion."])["rougeL"] == pytest.approx(2 * p * r / (p + r))
