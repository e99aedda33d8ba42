"""Dice + CE against the docstring formula, computed by hand with numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medalloy.losses import DiceCELoss


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _reference(logits: np.ndarray, target: np.ndarray, smooth: float = 1e-5) -> float:
    """CE (mean over voxels) + 1 - mean over foreground classes of the batch Dice."""
    k = logits.shape[1]
    p = _softmax(logits.astype(np.float64))
    onehot = np.stack([(target == c) for c in range(k)], axis=1).astype(np.float64)
    ce = -(np.log(p) * onehot).sum(axis=1).mean()
    dices = []
    for c in range(1, k):
        inter = (p[:, c] * onehot[:, c]).sum()
        dices.append((2 * inter + smooth) / (p[:, c].sum() + onehot[:, c].sum() + smooth))
    return float(ce + 1.0 - np.mean(dices))


def test_perfect_logits_give_near_zero():
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[:, 2:5, 3:6] = 1
    target[1, 6:, 6:] = 2
    logits = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 50.0
    assert DiceCELoss()(logits, target).item() == pytest.approx(0.0, abs=1e-5)


def test_hand_computed_two_class_case():
    # 2 images of 2x2 pixels; foreground: (0,0) in image 0, (0,1) and (1,1) in image 1
    logits = np.zeros((2, 2, 2, 2))
    logits[0, 1] = [[2.0, -1.0], [0.0, 1.0]]
    logits[1, 1] = [[-2.0, 3.0], [0.5, -0.5]]
    target = np.array([[[1, 0], [0, 0]], [[0, 1], [0, 1]]])
    # by hand: p_fg = sigmoid(logit difference); CE = mean of -log p(true class)
    pf = 1.0 / (1.0 + np.exp(-(logits[:, 1] - logits[:, 0])))
    ce = -np.mean(np.where(target == 1, np.log(pf), np.log(1 - pf)))
    inter = (pf * target).sum()
    dice = (2 * inter + 1e-5) / (pf.sum() + target.sum() + 1e-5)
    expected = ce + 1 - dice
    assert expected == pytest.approx(_reference(logits, target))
    got = DiceCELoss()(torch.tensor(logits, dtype=torch.float32), torch.tensor(target))
    assert got.item() == pytest.approx(expected, abs=1e-4)


def test_three_class_batch_dice_random():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 3, 5, 4))
    target = rng.integers(0, 3, size=(3, 5, 4))
    got = DiceCELoss()(torch.tensor(logits, dtype=torch.float32), torch.tensor(target)).item()
    assert got == pytest.approx(_reference(logits, target), abs=1e-4)
    # batch Dice differs from the per-image mean, so a per-image implementation would fail above
    per_image = np.mean([_reference(logits[i : i + 1], target[i : i + 1]) for i in range(3)])
    assert abs(per_image - got) > 1e-3


def test_target_with_or_without_channel_axis():
    rng = np.random.default_rng(1)
    logits = torch.tensor(rng.normal(size=(2, 3, 6, 6)), dtype=torch.float32)
    target = torch.tensor(rng.integers(0, 3, size=(2, 6, 6)))
    loss = DiceCELoss()
    a = loss(logits, target)
    b = loss(logits, target[:, None])
    assert torch.equal(a, b)


def test_bf16_logits_computed_in_fp32_and_differentiable():
    rng = np.random.default_rng(2)
    logits = torch.tensor(rng.normal(size=(2, 2, 4, 4)), dtype=torch.float32)
    target = torch.tensor(rng.integers(0, 2, size=(2, 4, 4)))
    out = DiceCELoss()(logits.to(torch.bfloat16), target)
    assert out.dtype == torch.float32
    ref = _reference(logits.to(torch.bfloat16).float().numpy(), target.numpy())
    assert out.item() == pytest.approx(ref, abs=1e-4)
    z = logits.clone().requires_grad_(True)
    DiceCELoss()(z, target).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_smoothing_term_is_the_one_given():
    # smooth enters numerator and denominator alike; a large one makes the difference visible
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 3, 4, 4))
    target = rng.integers(0, 3, size=(2, 4, 4))
    got = DiceCELoss(smooth=1.0)(torch.tensor(logits, dtype=torch.float32), torch.tensor(target)).item()
    ref = _reference(logits, target, smooth=1.0)
    assert abs(ref - _reference(logits, target)) > 1e-3
    assert got == pytest.approx(ref, abs=1e-5)
