"""Per-task BCE + adaptive Tversky Dice against a numpy reference of the docstring formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medalloy.losses import TaskBCEDiceLoss


def _reference(z: np.ndarray, y: np.ndarray, w: np.ndarray, ids: np.ndarray | None = None, smooth: float = 1e-5, adaptive: bool = True) -> float:
    """The docstring's formula, loop by loop: BCE per (sample, slot), Tversky per task id over
    every (sample, slot) that annotates it."""
    z, y = z.astype(np.float64), y.astype(np.float64)
    b, t = w.shape
    ids = np.tile(np.arange(t), (b, 1)) if ids is None else ids
    bce_sum, sums = 0.0, {}
    for i in range(b):
        for j in range(t):
            p = 1 / (1 + np.exp(-z[i, j]))
            bce_sum += w[i, j] * np.mean(-(y[i, j] * np.log(p) + (1 - y[i, j]) * np.log(1 - p)))
            if w[i, j] > 0:
                acc = sums.setdefault(int(ids[i, j]), np.zeros(3))
                acc += w[i, j] * np.array([(p * y[i, j]).sum(), (p * (1 - y[i, j])).sum(), ((1 - p) * y[i, j]).sum()])
    dice = []
    for tp, fp, fn in sums.values():
        a = np.clip(fp / (fp + fn), 0.2, 0.8) if adaptive and fp + fn > 0 else 0.5
        dice.append(1 - (tp + smooth) / (tp + a * fp + (1 - a) * fn + smooth))
    return bce_sum / w.sum() + float(np.mean(dice))


@pytest.mark.parametrize("adaptive", [True, False])
def test_matches_the_formula(adaptive):
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (3, 4, 6, 5)).astype(np.float32)
    y = (rng.random((3, 4, 6, 5)) < 0.3).astype(np.float32)
    w = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]], np.float32)
    got = TaskBCEDiceLoss(adaptive=adaptive)(torch.from_numpy(z), torch.from_numpy(y), torch.from_numpy(w))
    assert float(got) == pytest.approx(_reference(z, y, w, adaptive=adaptive), rel=1e-5)
    # slots of different samples that hold one task pool into one Dice (mixed-dataset batches)
    ids = np.array([[0, 1, 5, 5], [1, 5, 0, 5], [5, 5, 5, 2]])
    got = TaskBCEDiceLoss(adaptive=adaptive, num_tasks=6)(torch.from_numpy(z), torch.from_numpy(y), torch.from_numpy(w), torch.from_numpy(ids))
    assert float(got) == pytest.approx(_reference(z, y, w, ids, adaptive=adaptive), rel=1e-5)


def test_empty_targets_do_not_drown_the_one_sample_that_has_the_structure():
    # A small structure in one sample of eight (the MR core): the Dice gradient on that sample
    # must not shrink because seven already-empty predictions join the batch. Per-sample Dice with
    # smooth 1 divided it by eight and pulled every empty pair towards predicting nothing.
    y = torch.zeros(1, 1, 16, 16)
    y[..., 6:9, 6:9] = 1
    z = torch.full_like(y, -2.0)
    z[..., 5:9, 5:9] = 0.5

    def dice_grad(batch_z, batch_y):
        """Gradient of the Dice part alone (the loss minus its BCE part) on the first sample."""
        batch_z = batch_z.clone().requires_grad_(True)
        total = TaskBCEDiceLoss()(batch_z, batch_y, torch.ones(batch_z.shape[:2]))
        bce = torch.nn.functional.binary_cross_entropy_with_logits(batch_z, batch_y, reduction="none").flatten(2).mean(-1).mean()
        (total - bce).backward()
        return batch_z.grad[0]

    alone = dice_grad(z, y)
    empty_z = torch.full((7, 1, 16, 16), -8.0)
    with_empty = dice_grad(torch.cat([z, empty_z]), torch.cat([y, torch.zeros(7, 1, 16, 16)]))
    ratio = float(with_empty.norm() / alone.norm())
    assert 0.9 < ratio <= 1.0 + 1e-6, ratio


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


def test_task_slots_are_treated_alike():
    # three tasks of the same size in the three slots: the same gradient inside and outside each
    # (a slot-dependent loss would leave one class behind, as suspected on ACDC's RV)
    lab = torch.zeros(4, 16, 16, dtype=torch.long)
    lab[:, 2:6, 2:6], lab[:, 8:12, 8:12], lab[:, 2:6, 10:14] = 1, 2, 3
    target = torch.stack([(lab == k + 1).float() for k in range(3)], 1)
    z = torch.zeros(4, 3, 16, 16, requires_grad=True)
    TaskBCEDiceLoss(num_tasks=4)(z, target, torch.ones(4, 3), torch.tensor([[0, 1, 2]] * 4)).backward()
    inside = [z.grad[:, k][target[:, k] > 0].mean() for k in range(3)]
    outside = [z.grad[:, k][target[:, k] == 0].mean() for k in range(3)]
    assert inside[0] < 0 < outside[0]
    torch.testing.assert_close(torch.stack(inside), inside[0].expand(3))
    torch.testing.assert_close(torch.stack(outside), outside[0].expand(3))


def _exclusive_reference(z: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """The docstring's exclusive CE, pixel by pixel: softmax over [0, annotated slots]."""
    z, y = z.astype(np.float64), y.astype(np.float64)
    num, den = 0.0, 0.0
    for i in range(w.shape[0]):
        slots = [j for j in range(w.shape[1]) if w[i, j] > 0]
        if not slots:
            continue
        logits = np.stack([np.zeros_like(z[i, 0])] + [z[i, j] for j in slots])  # (1 + |A|, *sp)
        cls = np.zeros(z.shape[2:], int)
        for k, j in enumerate(slots):
            cls[y[i, j] > 0] = k + 1
        logp = logits - np.log(np.exp(logits).sum(0))
        ce = -np.take_along_axis(logp, cls[None], 0)[0].mean()
        num, den = num + w[i, slots].max() * ce, den + w[i, slots].max()
    return num / den


def test_exclusive_class_term_matches_the_formula_and_is_the_bce_for_one_task():
    rng = np.random.default_rng(3)
    z = rng.normal(0, 2, (3, 3, 6, 5)).astype(np.float32)
    lab = rng.integers(0, 4, (3, 6, 5))
    y = np.stack([(lab == k + 1) for k in range(3)], 1).astype(np.float32)  # a label map: one class per pixel
    w = np.array([[1, 1, 1], [1, 0, 1], [0, 0, 0]], np.float32)  # sample 2 annotates nothing; sample 1 lacks slot 1
    y[1, 1] = 0  # an unannotated slot holds no target
    loss = TaskBCEDiceLoss(exclusive=True)
    loss(torch.from_numpy(z), torch.from_numpy(y), torch.from_numpy(w))
    assert float(loss.last["bce"]) == pytest.approx(_exclusive_reference(z, y, w), rel=1e-5)
    # one task a sample: softmax([0, z]) = [1 - sigmoid(z), sigmoid(z)], so the whole loss is the BCE form's
    one = (torch.from_numpy(z[:, :1]), torch.from_numpy(y[:, :1]), torch.ones(3, 1))
    torch.testing.assert_close(TaskBCEDiceLoss(exclusive=True)(*one), TaskBCEDiceLoss()(*one))


def test_exclusive_classes_compete_for_a_pixel():
    # a pixel of class 1 where slot 2 is confidently on: the exclusive term pushes slot 2 down there,
    # the per-task BCE only through slot 2's own target (the same push) but never lifts slot 1 by
    # more than its own sigmoid error; with slot 2 off the two agree on slot 1, with it on they differ
    y = torch.zeros(1, 2, 1, 1)
    y[0, 0] = 1
    for z2, differs in ((-20.0, False), (3.0, True)):
        z = torch.tensor([0.0, z2]).view(1, 2, 1, 1).requires_grad_(True)
        TaskBCEDiceLoss(exclusive=True)._exclusive_ce(z.flatten(2), y.flatten(2), torch.ones(1, 2)).backward()
        g_excl = z.grad.clone()
        z.grad = None
        torch.nn.functional.binary_cross_entropy_with_logits(z, y).backward()
        g_bce = z.grad.clone() * 2  # the mean over two slots halves the BCE's gradient
        assert (abs(float(g_excl[0, 0] - g_bce[0, 0])) > 0.05) == differs
        assert float(g_excl[0, 0]) < 0  # slot 1 is always pushed up on its own pixel


def test_adaptive_alpha_follows_the_smaller_error_too():
    # under-segmentation (FN > FP): alpha = FP / (FP + FN) < 0.5 here, not the soft Dice's 0.5
    rng = np.random.default_rng(4)
    z = rng.normal(-1.5, 2, (2, 2, 6, 5)).astype(np.float32)
    y = (rng.random((2, 2, 6, 5)) < 0.7).astype(np.float32)
    w = np.ones((2, 2), np.float32)
    p = 1 / (1 + np.exp(-z.astype(np.float64)))
    fp, fn = (p * (1 - y)).sum((0, 2, 3)), ((1 - p) * y).sum((0, 2, 3))
    assert np.all(fp / (fp + fn) < 0.4)
    got = TaskBCEDiceLoss()(torch.from_numpy(z), torch.from_numpy(y), torch.from_numpy(w))
    assert float(got) == pytest.approx(_reference(z, y, w), rel=1e-5)


def test_one_task_with_errors_summing_below_one_matches_the_formula():
    # one task (the Dice term is its own, not halved) and a nearly right prediction whose FP and FN,
    # 0.14 and 0.30, sum below 1: alpha is still their ratio, 0.33
    y = torch.zeros(1, 1, 4, 4)
    y[..., :2, :] = 1
    z = torch.where(y > 0, 3.25, -4.0)
    p = torch.sigmoid(z.double())
    fp, fn = float((p * (1 - y)).sum()), float(((1 - p) * y).sum())
    assert fp + fn < 1 and 0.25 < fp / (fp + fn) < 0.4 and fp < 0.2
    loss = TaskBCEDiceLoss()
    total = loss(z, y, torch.ones(1, 1))
    want = _reference(z.numpy(), y.numpy(), np.ones((1, 1), np.float32))
    assert float(total) == pytest.approx(want, rel=1e-5)
    bce = float(torch.nn.functional.binary_cross_entropy_with_logits(z.double(), y.double()))
    # the parts the universal recipe logs under these names
    assert float(loss.last["bce"]) == pytest.approx(bce, rel=1e-5)
    assert float(loss.last["dice"]) == pytest.approx(want - bce, rel=1e-4)


def test_a_confidently_empty_prediction_of_an_empty_target_costs_nothing():
    # no TP, FP or FN to speak of: the smoothing term makes the Tversky index 1 (the docstring's
    # batch Dice with s = 1e-5), not 0 or -1
    y = torch.zeros(2, 1, 4, 4)
    assert float(TaskBCEDiceLoss()(torch.full_like(y, -30.0), y, torch.ones(2, 1))) < 1e-5


def test_fractional_weights_are_a_weighted_mean():
    # weights summing below 1 normalise like any others, in the per-task BCE and the exclusive CE
    rng = np.random.default_rng(5)
    z = rng.normal(0, 2, (2, 2, 4, 4)).astype(np.float32)
    lab = rng.integers(0, 3, (2, 4, 4))
    y = np.stack([(lab == k + 1) for k in range(2)], 1).astype(np.float32)
    w = np.array([[0.2, 0.3], [0.1, 0.0]], np.float32)
    args = (torch.from_numpy(z), torch.from_numpy(y), torch.from_numpy(w))
    assert float(TaskBCEDiceLoss()(*args)) == pytest.approx(_reference(z, y, w), rel=1e-5)
    exclusive = TaskBCEDiceLoss(exclusive=True)
    exclusive(*args)
    assert float(exclusive.last["bce"]) == pytest.approx(_exclusive_reference(z, y, w), rel=1e-5)


def test_a_target_of_another_shape_is_refused_not_broadcast():
    with pytest.raises(ValueError, match="weight"):
        TaskBCEDiceLoss()(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 1, 1), torch.ones(2, 3))
