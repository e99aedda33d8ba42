"""LR schedules against hand values, EMA against its formula, precision resolution on CPU."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medalloy.engine import precision as prec
from medalloy.engine.ema import EMA
from medalloy.engine.schedule import lr_factor
from medalloy.errors import MedalloyError
from medalloy.seeding import step_rng, step_seed


# -- schedules -------------------------------------------------------------------------------------
def test_poly_hand_values():
    assert lr_factor(0, 10, "poly") == 1.0
    assert lr_factor(5, 10, "poly") == pytest.approx(0.5**0.9)
    assert lr_factor(9, 10, "poly") == pytest.approx(0.1**0.9)
    assert lr_factor(10, 10, "poly") == 0.0
    assert lr_factor(3, 4, "poly", power=1.0) == pytest.approx(0.25)


def test_cosine_hand_values():
    assert lr_factor(0, 8, "cosine") == pytest.approx(1.0)
    assert lr_factor(2, 8, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(4, 8, "cosine") == pytest.approx(0.5)
    assert lr_factor(8, 8, "cosine") == pytest.approx(0.0, abs=1e-12)


def test_warmup_then_decay():
    # warm-up 4 of 12 steps: 1/4, 2/4, 3/4, 4/4, then poly over the 8 remaining steps
    assert [lr_factor(s, 12, "poly", warmup=4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 12, "poly", warmup=4) == 1.0
    assert lr_factor(8, 12, "poly", warmup=4) == pytest.approx(0.5**0.9)
    assert lr_factor(8, 12, "cosine", warmup=4) == pytest.approx(0.5)
    assert lr_factor(2, 12, "constant", warmup=4) == 0.75
    assert lr_factor(11, 12, "constant", warmup=4) == 1.0


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(1, 10, "step")


# -- EMA -------------------------------------------------------------------------------------------
def test_ema_two_updates_match_formula():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    d = 0.9
    w0 = net[0].weight.detach().clone()
    ema = EMA(net, d)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    w1 = net[0].weight.detach().clone()
    ema.update(net)
    with torch.no_grad():
        net[0].weight.mul_(-2.0)
    w2 = net[0].weight.detach().clone()
    ema.update(net)
    expected = d * (d * w0 + (1 - d) * w1) + (1 - d) * w2
    assert torch.allclose(ema.shadow["0.weight"], expected, atol=1e-6)
    # integer buffers (BatchNorm's num_batches_tracked) are not averaged
    assert "1.num_batches_tracked" not in ema.shadow and "1.running_mean" in ema.shadow


def test_ema_applied_swaps_and_restores():
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    ema = EMA(net, 0.5)
    original = {k: v.clone() for k, v in net.state_dict().items()}
    ema.shadow["weight"].fill_(7.0)
    with ema.applied(net) as m:
        assert m is net
        assert torch.equal(net.weight, torch.full((3, 4), 7.0))
        assert torch.equal(net.bias, original["bias"])  # shadow of bias unchanged = original
    for k, v in net.state_dict().items():
        assert torch.equal(v, original[k])
    # restored even when the body raises
    with pytest.raises(RuntimeError):
        with ema.applied(net):
            raise RuntimeError("boom")
    assert torch.equal(net.weight, original["weight"])


def test_ema_state_round_trip_and_bad_decay():
    net = nn.Linear(2, 2)
    ema = EMA(net, 0.99)
    other = EMA(nn.Linear(2, 2), 0.99)
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(other.shadow[k], ema.shadow[k]) for k in ema.shadow)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError):
            EMA(net, bad)


# -- precision -------------------------------------------------------------------------------------
CPU = torch.device("cpu")


def test_fp16_on_cpu_raises():
    with pytest.raises(MedalloyError, match="fp16"):
        prec.resolve_precision("fp16", CPU)


def test_unknown_precision_raises():
    with pytest.raises(MedalloyError, match="unknown precision 'fp8'"):
        prec.resolve_precision("fp8", CPU)


@pytest.mark.parametrize("supported, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cpu_follows_bf16_support(monkeypatch, supported, expected):
    monkeypatch.setattr(prec, "cpu_supports_bf16", lambda: supported)
    assert prec.resolve_precision("auto", CPU) == expected
    # explicit choices are kept whatever the hardware
    assert prec.resolve_precision("fp32", CPU) == "fp32"
    assert prec.resolve_precision("bf16", CPU) == "bf16"


def test_autocast_contexts():
    a = torch.randn(4, 4)
    with prec.autocast("fp32", CPU):
        assert (a @ a).dtype == torch.float32
    with prec.autocast("bf16", CPU):
        assert (a @ a).dtype == torch.bfloat16


# -- seeds -----------------------------------------------------------------------------------------
def test_step_seed_is_pure_and_distinct():
    assert step_seed(0, 5, 1, 2) == step_seed(0, 5, 1, 2)
    seeds = {step_seed(0, s, r, i) for s in range(5) for r in range(2) for i in range(3)}
    assert len(seeds) == 30 and all(0 <= s < 2**63 for s in seeds)
    assert step_rng(1, 2).integers(1 << 30) == step_rng(1, 2).integers(1 << 30)
