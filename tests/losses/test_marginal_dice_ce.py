"""MarginalDiceCELoss: unannotated classes merged into background; DiceCELoss when every class is annotated."""

from __future__ import annotations

import math

import pytest
import torch

from medalloy.losses.dice_ce import DiceCELoss
from medalloy.losses.marginal_dice_ce import MarginalDiceCELoss


def _logits(*probs: tuple[float, ...]) -> torch.Tensor:
    """Pixels' class probabilities -> logits ``(1, K, 1, N)``."""
    return torch.tensor(probs, dtype=torch.float64).log().T[None, :, None, :].float()


def test_hand_computed_value() -> None:
    # K = 3 (background, lung, heart), the dataset annotates lung (1) only
    z = _logits((0.2, 0.5, 0.3), (0.3, 0.1, 0.6))
    y = torch.tensor([[[1, 0]]])
    # q: pixel a (0.2 + 0.3, 0.5), pixel b (0.3 + 0.6, 0.1); CE over both, batch Dice of lung
    ce = -(math.log(0.5) + math.log(0.9)) / 2
    dice = (2 * 0.5 + 1e-5) / (0.5 + 0.1 + 1 + 1e-5)
    assert MarginalDiceCELoss(3, [1])(z, y).item() == pytest.approx(ce + 1 - dice, abs=1e-5)


def test_mass_moved_between_background_and_an_unannotated_class_costs_nothing() -> None:
    y = torch.tensor([[[1, 0]]])
    a = _logits((0.2, 0.5, 0.3), (0.3, 0.1, 0.6))
    b = _logits((0.45, 0.5, 0.05), (0.85, 0.1, 0.05))  # same p_lung, background and heart traded
    marginal = MarginalDiceCELoss(3, [1])
    assert marginal(a, y).item() == pytest.approx(marginal(b, y).item(), abs=1e-6)
    assert abs(DiceCELoss()(a, y).item() - DiceCELoss()(b, y).item()) > 0.1  # the plain loss penalises the heart


def test_every_class_annotated_is_dice_ce() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 8, 8, generator=g)
    y = torch.randint(0, 3, (2, 1, 8, 8), generator=g)
    assert MarginalDiceCELoss(3, [1, 2])(z, y).item() == pytest.approx(DiceCELoss()(z, y).item(), abs=1e-5)


def test_gradients_flow_and_bad_inputs_are_refused() -> None:
    z = torch.randn(1, 3, 4, 4, requires_grad=True)
    MarginalDiceCELoss(3, [2])(z, torch.zeros(1, 1, 4, 4, dtype=torch.long)).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    with pytest.raises(ValueError, match="outside background and the annotated"):
        MarginalDiceCELoss(3, [1])(torch.randn(1, 3, 2, 2), torch.full((1, 1, 2, 2), 2))
    with pytest.raises(ValueError, match="must be in 1..2"):
        MarginalDiceCELoss(3, [0])
    with pytest.raises(ValueError, match="built for 3"):
        MarginalDiceCELoss(3, [1])(torch.randn(1, 4, 2, 2), torch.zeros(1, 1, 2, 2))


def test_an_unannotated_first_class_is_merged_into_background() -> None:
    # the dataset annotates class 2 only: softmax over [logsumexp(z_0, z_1), z_2] gives [p_0 + p_1, p_2],
    # so the marginal loss is the plain two-class DiceCELoss on those logits, target 2 read as 1
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 4, 4, generator=g)
    y = torch.randint(0, 2, (2, 1, 4, 4), generator=g) * 2
    merged = torch.cat([torch.logsumexp(z[:, :2], 1, keepdim=True), z[:, 2:]], 1)
    want = DiceCELoss()(merged, y // 2).item()
    assert abs(want - DiceCELoss()(z, y).item()) > 1e-2
    assert MarginalDiceCELoss(3, [2])(z, y).item() == pytest.approx(want, abs=1e-5)


def test_the_smoothing_term_reaches_both_dice_terms() -> None:
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 3, 4, 4, generator=g)
    y = torch.randint(0, 3, (2, 1, 4, 4), generator=g)
    want = DiceCELoss(smooth=1.0)(z, y).item()
    assert abs(want - DiceCELoss()(z, y).item()) > 1e-3
    assert MarginalDiceCELoss(3, [1, 2], smooth=1.0)(z, y).item() == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("bad", [3, 4, -1])
def test_a_target_outside_the_network_classes_is_refused(bad: int) -> None:
    # class 2 is annotated: a target of 3 (or an ignore label -1) must not be read as class 2 by a clamp
    # or a wrapped index
    y = torch.zeros(1, 1, 2, 2, dtype=torch.long)
    y[0, 0, 0, 0] = bad
    with pytest.raises(ValueError, match="outside background and the annotated"):
        MarginalDiceCELoss(3, [1, 2])(torch.randn(1, 3, 2, 2), y)
