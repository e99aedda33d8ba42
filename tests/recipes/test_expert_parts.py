"""Pieces of the expert recipe: deep supervision used by the loss (never built unused), the
prediction registry."""

from __future__ import annotations

import pytest
import torch

from medalloy.errors import MedalloyError
from medalloy.losses import DiceCELoss
from medalloy.models.unet import build_unet
from medalloy.planning.plan import ChannelNorm, NetworkPlan, Plan
from medalloy.recipes.expert import deep_supervision_weights, expert_loss


def _plan(deep_supervision: bool) -> Plan:
    network = NetworkPlan(kernels=[[3, 3]] * 4, strides=[[1, 1], [2, 2], [2, 2], [2, 2]], filters=[4, 8, 8, 8], deep_supervision=deep_supervision)
    return Plan(
        dataset="toy", dim=2, in_channels=1, target_spacing=[1.0, 1.0], patch_size=[32, 32], batch_size=2,
        normalization=[ChannelNorm(scheme="zscore")], label_values=[0, 1, 2], labels={"background": 0, "a": 1, "b": 2}, network=network,
    )  # fmt: skip


def test_deep_supervision_weights_are_nnunets():
    assert deep_supervision_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert deep_supervision_weights(1) == [1.0]


def test_deep_supervision_heads_are_trained_by_the_loss():
    torch.manual_seed(0)
    plan = _plan(True)
    net = build_unet(plan.network, plan.in_channels, plan.num_classes).train()
    x = torch.randn(2, 1, 32, 32)
    y = torch.randint(0, 3, (2, 1, 32, 32))
    out = net(x)
    assert out.shape == (2, 3, 3, 32, 32)  # (B, main + 2 heads, K, *patch)
    loss = expert_loss(plan)(out, y)
    base = DiceCELoss()
    expected = sum(w * base(out[:, i].float(), y) for i, w in enumerate(deep_supervision_weights(3)))
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    loss.backward()
    unused = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not unused, unused  # DDP would stall on parameters no loss reaches


def test_without_deep_supervision_no_heads_are_built():
    plan = _plan(False)
    net = build_unet(plan.network, plan.in_channels, plan.num_classes)
    assert not any("deep_supervision" in n for n, _ in net.named_parameters())
    assert isinstance(expert_loss(_plan(False)), DiceCELoss)


def test_prediction_loaders_come_from_the_recipes(tmp_path):
    from medalloy.engine import checkpoint as ckpt
    from medalloy.predict import load_model
    from medalloy.recipes.registry import register, registered

    assert {"expert", "universal"} <= set(registered())
    with pytest.raises(ValueError, match="registered already"):
        register("expert", lambda path, device, dataset=None: None)
    path = ckpt.save_checkpoint(tmp_path / "x.safetensors", {"model/net/w": torch.zeros(1)}, {"method": "alchemy"})
    with pytest.raises(MedalloyError, match="cannot predict with a 'alchemy' checkpoint.*expert") as exc:
        load_model(path)
    assert "\n" not in str(exc.value) and "x.safetensors" in str(exc.value)
    plan = _plan(False)
    net = build_unet(plan.network, plan.in_channels, plan.num_classes)
    good = ckpt.save_checkpoint(
        tmp_path / "e.safetensors", ckpt.prefixed(net.state_dict(), "model/net"), {"method": "expert", "plan": plan.model_dump(mode="json")}
    )
    model, loaded_plan, record = load_model(good)
    assert loaded_plan == plan and record["method"] == "expert" and not model.training


def _dice_ce_by_hand(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """CE + (1 - batch soft Dice over the foreground classes), written out apart from DiceCELoss/MONAI."""
    y = label[:, 0].long()
    ce = torch.nn.functional.cross_entropy(logits, y)
    p = logits.softmax(1)
    onehot = torch.nn.functional.one_hot(y, logits.shape[1]).movedim(-1, 1).float()
    axes = [0, *range(2, logits.ndim)]
    dice = (2 * (p * onehot).sum(axes) + 1e-5) / (p.sum(axes) + onehot.sum(axes) + 1e-5)
    return ce + 1 - dice[1:].mean()


@pytest.mark.slow
@pytest.mark.parametrize("deep_supervision", [False, True])
def test_train_expert_total_is_dice_plus_ce_with_nnunets_head_weights(deep_supervision, tmp_path, monkeypatch):
    # The expert's loss has no configurable term weights, so its logged total is pinned against an
    # independent computation on what the step's loss saw: CE + Dice, and with deep supervision the
    # heads weighed 4/7, 2/7, 1/7 (1, 1/2, 1/4 normalised). Driven through train_expert for one step.
    from medalloy.data.dataset import RawDataset
    from medalloy.data.synth import generate_dataset
    from medalloy.engine.logging import read_metrics
    from medalloy.planning.fingerprint import fingerprint
    from medalloy.planning.planner import plan_dataset
    from medalloy.recipes import expert as expert_recipe

    path = generate_dataset("Dataset902_SynthCXR", tmp_path / "synth", seed=1, cases_per_source=2, test_cases_per_source=0, progress=False)
    ds = RawDataset(path)
    plan = plan_dataset(ds, fingerprint(ds, progress=False), max_2d_side=64, base_filters=8)
    plan = plan.model_copy(update={"batch_size": 2, "network": plan.network.model_copy(update={"deep_supervision": deep_supervision})})
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = expert_recipe.expert_loss

    def spying_loss(the_plan):
        fn = real(the_plan)

        def loss(logits, label):
            seen.append((logits.detach().float().clone(), label.detach().clone()))
            return fn(logits, label)

        return loss

    monkeypatch.setattr(expert_recipe, "expert_loss", spying_loss)
    cfg = expert_recipe.ExpertConfig(folds=2, max_val_cases=0)
    # lr must be > 0; the logged loss of the one step is that of the weights before its update anyway
    cfg.train.steps, cfg.train.val_every, cfg.train.log_every, cfg.train.lr, cfg.train.precision = 1, 1, 1, 1e-12, "fp32"
    expert_recipe.train_expert(path, tmp_path / "run", plan=plan, config=cfg, progress=False)
    (row,) = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    ((logits, label),) = seen
    if deep_supervision:
        assert logits.shape[:3] == (2, 3, 3)  # (B, full resolution + 2 heads, K): every head reaches the loss
        heads, weights = logits.unbind(1), [4 / 7, 2 / 7, 1 / 7]
    else:
        assert logits.shape[:2] == (2, 3)
        heads, weights = [logits], [1.0]
    expected = sum(w * _dice_ce_by_hand(h, label) for w, h in zip(weights, heads))
    assert row["loss"] == pytest.approx(float(expected), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("plan_for_budget", [True, False])
def test_an_expert_with_a_time_budget_trains_the_budget_planners_plan(tmp_path, monkeypatch, plan_for_budget):
    from medalloy.data.dataset import RawDataset
    from medalloy.data.synth import generate_dataset
    from medalloy.planning.fingerprint import fingerprint
    from medalloy.planning.plan import load_plan
    from medalloy.planning.planner import plan_dataset
    from medalloy.recipes import expert as expert_recipe
    from medalloy.recipes import step_timing

    monkeypatch.setenv("MEDALLOY_CACHE", str(tmp_path / "cache"))
    # a machine on which the full-resolution step is too slow for the budget: 1 s a step at 112 px, 16 filters
    monkeypatch.setattr(step_timing, "measure_step_seconds", lambda plan, device: (plan.patch_size[0] / 112) ** 2 * (plan.network.filters[0] / 16) ** 2)
    path = generate_dataset("Dataset902_SynthCXR", tmp_path / "synth", seed=1, cases_per_source=2, test_cases_per_source=0, progress=False)
    cfg = expert_recipe.ExpertConfig(folds=2, max_val_cases=1, plan_for_budget=plan_for_budget)
    cfg.train.time_budget_minutes, cfg.train.val_every, cfg.train.precision = 0.02, 1000, "fp32"
    summary = expert_recipe.train_expert(path, tmp_path / "run", config=cfg, progress=False)
    plan = load_plan(tmp_path / "run" / "plan.json")
    own = plan_dataset(RawDataset(path), fingerprint(RawDataset(path), progress=False))
    if not plan_for_budget:
        assert plan.budget is None and plan.patch_size == own.patch_size and "budget_check" not in summary
        return
    # the run says what the planner expected and what it did (a run that stops early shows here)
    check = summary["budget_check"]
    chosen = next(c for c in plan.budget.candidates if c.name == plan.budget.chosen)
    assert (check["expected_steps"], check["expected_epochs"], check["steps"]) == (chosen.expected_steps, chosen.expected_epochs, summary["steps"])
    assert check["epochs"] == round(summary["steps"] * plan.batch_size / 2, 1)
    # 1.2 s of training cannot give the 112 px plan its epochs: a coarser or narrower plan, and why
    assert plan.budget.minutes == 0.02 and plan.budget.train_cases == 2 and plan.budget.chosen != "full resolution"
    assert plan.budget.candidates[0].patch_size == own.patch_size
    assert plan.patch_size != own.patch_size or plan.network.filters != own.network.filters
