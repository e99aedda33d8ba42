"""Radiograph loading and the downstream metrics: values a wrong implementation would miss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medalloy.data.radiograph import augment_batch, load_radiograph
from medalloy.errors import MedalloyError
from medalloy.radiograph_tasks import balanced_accuracy, caption_scores, linear_probe, list_images, probe_predictions, retrieval_recall, zero_shot_probs


def test_load_radiograph_keeps_aspect_and_zscores(tmp_path):
    img = np.zeros((40, 80), np.uint8)
    img[:, 40:] = 200  # right half bright
    Image.fromarray(img).save(tmp_path / "a.png")
    x = load_radiograph(tmp_path / "a.png", 32)
    assert x.shape == (1, 32, 32) and x.dtype == np.float32
    # 80 wide -> 32, 40 high -> 16 rows centred: rows 0-7 and 24-31 are padding at the image's minimum
    assert np.allclose(x[0, :8], x.min()) and np.allclose(x[0, 24:], x.min())
    body = x[0, 8:24]
    assert np.isclose(body.mean(), 0, atol=1e-5) and np.isclose(body.std(), 1, atol=0.03)  # z-scored before resizing
    assert body[:, :15].max() < 0 < body[:, 17:].min()  # left dark, right bright: no flip
    rgb = np.stack([img, img, img], -1)
    Image.fromarray(rgb).save(tmp_path / "b.png")
    assert np.allclose(load_radiograph(tmp_path / "b.png", 32), x, atol=1e-5)


def test_augment_is_seeded_and_identity_at_zero():
    x = torch.randn(3, 1, 16, 16)
    a = augment_batch(x, np.random.default_rng(1))
    assert torch.equal(a, augment_batch(x, np.random.default_rng(1))) and not torch.allclose(a, x)
    same = augment_batch(x, np.random.default_rng(1), degrees=0, scale=0, shift=0, contrast=0)
    assert torch.allclose(same, x, atol=1e-5)


def test_list_images_errors(tmp_path):
    with pytest.raises(MedalloyError, match="image folder not found"):
        list_images(tmp_path / "none")
    with pytest.raises(MedalloyError, match="no images"):
        list_images(tmp_path)


def test_retrieval_recall_by_hand():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    txt = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.9]])
    # image 0 ranks texts 1, 2, 0; image 1: 0, 2, 1; image 2: 2 first -> R@1 = R@2 = 1/3, R@3 = 1
    r = retrieval_recall(img, txt, ks=(1, 2, 3))
    assert r == pytest.approx({"r1": 1 / 3, "r2": 1 / 3, "r3": 1.0})
    # texts 0 and 1 say the same thing: image 0's top text (1) now counts
    r = retrieval_recall(img, txt, keys=["same", "same", "other"], ks=(1,))
    assert r["r1"] == pytest.approx(1.0)


def test_zero_shot_probs_sum_to_one_and_follow_similarity():
    p = zero_shot_probs(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), temperature=0.5)
    assert p.sum().item() == pytest.approx(1.0)
    assert p[0, 0].item() == pytest.approx(np.exp(2) / (np.exp(2) + 1))


def test_linear_probe_fraction_and_accuracy():
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(60, 5)))
    x[:, 0] += torch.where(x[:, 0] > 0, 0.5, -0.5)  # a margin around the boundary
    y = np.where(x[:, 0].numpy() > 0, "a", "b")
    assert linear_probe(x[:40], y[:40], x[40:], y[40:], fraction=1.0) == 1.0
    noise = torch.tensor(rng.normal(size=(60, 5)))  # features unrelated to the labels
    assert linear_probe(noise[:40], y[:40], noise[40:], y[40:]) < 0.9
    majority = np.array(["a"] * 20)
    truth = np.array(["a"] * 15 + ["b"] * 5)
    assert balanced_accuracy(majority, truth) == pytest.approx(0.5)  # 75 % accuracy, chance-level balanced
    # 5 % of 40 is 2 examples, one a class: still trains, and is seeded
    once = linear_probe(x[:40], y[:40], x[40:], y[40:], fraction=0.05, seed=3)
    assert once == linear_probe(x[:40], y[:40], x[40:], y[40:], fraction=0.05, seed=3)


def test_caption_scores():
    refs = ["small left pleural effusion.", "no acute cardiopulmonary abnormality.", "cardiomegaly."]
    perfect = caption_scores(refs, refs)
    assert perfect["bleu4"] == pytest.approx(1.0) and perfect["rougeL"] == pytest.approx(1.0)
    off = caption_scores(["right pleural effusion.", "no acute abnormality.", "cardiomegaly."], refs)
    assert 0 < off["bleu4"] < 1 and 0 < off["rougeL"] < 1
    # ROUGE-L F1 by hand (rouge-score drops punctuation): LCS "pleural effusion" = 2 of 3 and of 4 tokens
    p, r = 2 / 3, 2 / 4
    assert caption_scores(["right pleural effusion."], ["small left pleural effusion."])["rougeL"] == pytest.approx(2 * p * r / (p + r))


def test_probe_predictions_count_the_labels_learnt_from():
    rng = np.random.default_rng(0)
    y = np.array(["a"] * 30 + ["b"] * 10 + ["c"] * 2)
    centre = {"a": 0.0, "b": 5.0, "c": -5.0}
    x = torch.tensor([[centre[c] + 0.1 * rng.standard_normal(), rng.standard_normal()] for c in y])
    test_x, test_y = torch.tensor([[0.0, 0.0], [5.0, 0.0], [-5.0, 0.0]]), np.array(["a", "b", "c"])
    assert probe_predictions(x, y, test_x, 0.1, seed=0)[1] == 3 + 1 + 1  # round(10 % of 30), round(10 % of 10), and at least one of the two c's
    pred, used = probe_predictions(x, y, test_x, 1.0, seed=0)
    assert used == 42 and pred.tolist() == ["a", "b", "c"]
    assert linear_probe(x, y, test_x, test_y, 1.0, seed=0) == linear_probe(x, y, test_x, test_y, 1.0, seed=0, balanced=True) == 1.0
