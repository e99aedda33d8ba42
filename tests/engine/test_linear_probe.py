"""The linear probe's logistic regression: the labels it learns from, and accuracies a wrong solver would miss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medalloy.engine.linear_probe import linear_probe, probe_predictions, probe_scores


def test_linear_probe_fraction_and_accuracy():
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(60, 5)))
    x[:, 0] += torch.where(x[:, 0] > 0, 0.5, -0.5)  # a margin around the boundary
    y = np.where(x[:, 0].numpy() > 0, "a", "b")
    assert linear_probe(x[:40], y[:40], x[40:], y[40:], fraction=1.0) == 1.0
    noise = torch.tensor(rng.normal(size=(60, 5)))  # features unrelated to the labels
    assert linear_probe(noise[:40], y[:40], noise[40:], y[40:]) < 0.9
    # 5 % of 40 is 2 examples, one a class: still trains, and is seeded
    once = linear_probe(x[:40], y[:40], x[40:], y[40:], fraction=0.05, seed=3)
    assert once == linear_probe(x[:40], y[:40], x[40:], y[40:], fraction=0.05, seed=3)


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


def test_probe_scores_one_row_a_fraction_with_both_accuracies():
    rng = np.random.default_rng(0)
    y = np.array(["a"] * 30 + ["b"] * 10 + ["c"] * 2)
    centre = {"a": 0.0, "b": 5.0, "c": -5.0}
    x = torch.tensor([[centre[c] + 0.1 * rng.standard_normal(), rng.standard_normal()] for c in y])
    # the last image is a "c" that looks like a "b": 4 of 5 right, but the classes a, b, c get 1, 1 and 0 right
    test_x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [5.0, 0.0], [5.0, 0.0]])
    test_y = np.array(["a", "a", "a", "b", "c"])
    rows = probe_scores(x, y, test_x, test_y, [1, 0.1], seed=0)
    assert rows[0] == {"fraction": 1.0, "labels": 42, "accuracy": 0.8, "balanced_accuracy": pytest.approx(2 / 3)}
    assert isinstance(rows[0]["fraction"], float) and rows[1]["fraction"] == 0.1 and rows[1]["labels"] == 5
    pred, _ = probe_predictions(x, y, test_x, 0.1, seed=0)
    assert rows[1]["accuracy"] == float(np.mean(pred == test_y))
