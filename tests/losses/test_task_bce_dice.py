"""Per-task BCE + adaptive Tversky Dice against a numpy reference of the docstring formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medalloy.losses import TaskBCEDiceLoss


def _reference(z: np.ndarray, y: np.ndarray, w: np.ndarray, smooth: float = 1.0, adaptive: bool = True) -> float:
    z, y = z.astype(np.float64), y.astype(np.float64)
    b, t = w.shape
    num = 0.0
    for i in range(b):
        for j in range(t):
            p = 1 / (1 + np.exp(-z[i, j]))
            bce = np.mean(-(y[i, j] * np.log(p) + (1 - y[i, j]) * np.log(1 - p)))
            tp, fp, fn = (p * y[i, j]).sum(), (p * (1 - y[i, j])).sum(), ((1 - p) * y[i, j]).sum()
            a = np.clip(fp / (fp + fn), 0.2, 0.8) if adaptive and fp + fn > 0 else 0.5
            tv = (tp + smooth) / (tp + a * fp + (1 - a) * fn + smooth)
            num += w[i, j] * (bce + 1 - tv)
    return num / w.sum()


@pytest.mark.parametrize("adaptive", [True, False])
def test_matches_the_formula(adaptive):
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (3, 4, 6, 5)).astype(np.float32)
    y = (rng.random((3, 4, 6, 5)) < 0.3).astype(np.float32)
    w = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]], np.float32)
    got = TaskBCEDiceLoss(adaptive=adaptive)(torch.from_numpy(z), torch.from_numpy(y), torch.from_numpy(w))
    assert float(got) == pytest.approx(_reference(z, y, w, adaptive=adaptive), rel=1e-5)


def test_unlabelled_tasks_do_not_count():
    rng = np.random.default_rng(1)
    z = torch.from_numpy(rng.normal(0, 1, (2, 2, 8, 8)).astype(np.float32))
    y = torch.from_numpy((rng.random((2, 2, 8, 8)) < 0.5).astype(np.float32))
    w = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    loss = TaskBCEDiceLoss()
    base = loss(z, y, w)
    z2 = z.clone().requires_grad_(True)
    z2.data[:, 1] = 50.0  # any prediction for an unlabelled task
    out = loss(z2, y, w)
    torch.testing.assert_close(out, base)
    out.backward()
    assert z2.grad[:, 1].abs().max() == 0 and z2.grad[:, 0].abs().max() > 0


def test_confident_correct_prediction_is_near_zero_and_adaptive_alpha_weighs_the_larger_error():
    y = torch.zeros(1, 1, 10, 10)
    y[..., 2:6, 2:6] = 1
    good = (y * 2 - 1) * 20
    loss = TaskBCEDiceLoss()
    assert float(loss(good, y, torch.ones(1, 1))) < 1e-3
    # over-segmentation (FP only): adaptive alpha = 0.8 punishes it harder than the plain Dice
    over = torch.full_like(y, 20.0)
    assert float(TaskBCEDiceLoss()(over, y, torch.ones(1, 1))) > float(TaskBCEDiceLoss(adaptive=False)(over, y, torch.ones(1, 1)))


def test_shape_errors():
    with pytest.raises(ValueError, match="weight"):
        TaskBCEDiceLoss()(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), torch.ones(2))
