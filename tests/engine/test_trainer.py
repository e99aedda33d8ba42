"""The training loop on a tiny DynUNet: resume equivalence, logs, best checkpoint, errors, LR schedule."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medalloy.engine import checkpoint as ckpt
from medalloy.engine.distributed import DistInfo
from medalloy.engine.logging import read_metrics
from medalloy.engine.schedule import lr_factor
from medalloy.engine.trainer import TrainConfig, Trainer, TrainSpec
from medalloy.errors import MedalloyError
from medalloy.losses import DiceCELoss
from medalloy.models import build_unet
from medalloy.planning.plan import NetworkPlan
from medalloy.seeding import seed_everything, step_rng

NETWORK = NetworkPlan(kernels=[[3, 3]] * 3, strides=[[1, 1], [2, 2], [2, 2]], filters=[4, 8, 16])
RECORD = {"method": "test", "name": "tiny"}


class Killed(Exception):
    """Stands in for a SIGKILL in the middle of a run."""


def batches(step: int, dist: DistInfo) -> dict[str, torch.Tensor]:
    """A pure function of (step, rank): a noisy image and the mask of its bright half."""
    rng = step_rng(123, step, dist.rank)
    image = rng.normal(size=(2, 1, 32, 32)).astype(np.float32)
    label = (image > 0.3).astype(np.int64)
    return {"image": torch.from_numpy(image), "label": torch.from_numpy(label)}


def dice_validate(models: dict[str, nn.Module]) -> dict[str, float]:
    """Dice of the net on a fixed batch: depends on the weights only."""
    batch = batches(10_000, DistInfo())
    pred = models["net"](batch["image"]).argmax(1)
    target = batch["label"][:, 0]
    inter = float(((pred == 1) & (target == 1)).sum())
    return {"val/dice": 2 * inter / max(float((pred == 1).sum() + (target == 1).sum()), 1.0)}


def make_spec(
    validate: Callable | None = dice_validate,
    on_step_end: list[Callable] | None = None,
    nan_at: int | None = None,
    mode: str = "max",
    frozen: bool = False,
) -> TrainSpec:
    seed_everything(0)
    net = build_unet(NETWORK, in_channels=1, out_channels=2)
    models: dict[str, nn.Module] = {"net": net}
    if frozen:
        models["frozen"] = nn.Conv2d(1, 1, 1)
    loss_fn = DiceCELoss()

    def step_fn(models: dict[str, nn.Module], batch: dict) -> dict[str, torch.Tensor]:
        x = batch["image"]
        if frozen:
            x = x + 0.0 * models["frozen"](x)
        logits = models["net"](x)
        loss = loss_fn(logits, batch["label"])
        return {"loss": loss, "fg_logit": logits[:, 1].mean().detach()}

    def data(step: int, dist: DistInfo) -> dict:
        batch = batches(step, dist)
        if nan_at is not None and step == nan_at:
            batch["image"][0, 0, 0, 0] = float("nan")
        return batch

    return TrainSpec(
        models=models,
        trainable=["net"],
        step_fn=step_fn,
        batches=data,
        record=dict(RECORD),
        validate=validate,
        mode=mode,  # type: ignore[arg-type]
        on_step_end=list(on_step_end or []),
    )


def config(**kw) -> TrainConfig:
    base = dict(steps=8, lr=1e-2, val_every=4, checkpoint_every=4, log_every=1, progress=False, device="cpu", precision="fp32", seed=0)
    return TrainConfig(**{**base, **kw})


def _kill_at(step: int) -> Callable:
    def cb(s: int, _scalars: dict) -> None:
        if s == step:
            raise Killed(f"killed at step {s}")

    return cb


def _run_resume_pair(tmp_path: Path, **cfg) -> tuple[Trainer, Trainer, Path, Path]:
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a = Trainer(make_spec(), config(**cfg), a_dir)
    a.fit()
    b = Trainer(make_spec(on_step_end=[_kill_at(6)]), config(**cfg), b_dir)
    with pytest.raises(Killed):
        b.fit()
    assert b.step == 6
    assert ckpt.read_record(b_dir / "checkpoints" / "last.safetensors")["step"] == 4
    # the killed run logged steps 5 and 6, which the resumed run must redo, not duplicate
    assert [r["step"] for r in read_metrics(b_dir / "metrics.jsonl") if r["kind"] == "train"][-1] == 6
    resumed = Trainer(make_spec(), config(**cfg), b_dir)  # a new process: fresh model, same seed
    summary = resumed.fit(resume=True)
    assert summary["steps"] == 8 and resumed.step == 8
    return a, resumed, a_dir, b_dir


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"ema_decay": 0.9},
        {"optimizer": "sgd", "lr": 1e-3},
        {"schedule": "cosine", "warmup_steps": 3},
    ],
    ids=["adamw", "adamw-ema", "sgd", "cosine-warmup"],
)
def test_resume_is_bitwise_identical_fp32(tmp_path, cfg):
    a, b, a_dir, b_dir = _run_resume_pair(tmp_path, **cfg)
    _assert_same_state(a.spec.models["net"].state_dict(), b.spec.models["net"].state_dict())
    for n, e in a.ema.items():
        _assert_same_state(e.state_dict(), b.ema[n].state_dict())
    # the final checkpoints agree too (weights, EMA, optimizer state)
    ta, ra = ckpt.load_checkpoint(a_dir / "checkpoints" / "last.safetensors")
    tb, rb = ckpt.load_checkpoint(b_dir / "checkpoints" / "last.safetensors")
    _assert_same_state(ta, tb)
    assert ra["step"] == rb["step"] == 8 and ra["best"] == rb["best"]
    assert any(k.startswith("optim/") for k in ta)
    assert any(k.startswith("ema/") for k in ta) == bool(cfg.get("ema_decay"))
    # metrics: same rows (train losses bit-equal), no step logged twice after the resume
    rows_a = [{k: v for k, v in r.items() if k not in ("images_per_s", "data_fraction", "time")} for r in read_metrics(a_dir / "metrics.jsonl")]
    rows_b = [{k: v for k, v in r.items() if k not in ("images_per_s", "data_fraction", "time")} for r in read_metrics(b_dir / "metrics.jsonl")]
    assert rows_a == rows_b
    train_steps = [r["step"] for r in rows_b if r["kind"] == "train"]
    val_steps = [r["step"] for r in rows_b if r["kind"] == "val"]
    assert train_steps == list(range(1, 9)) and val_steps == [4, 8]


def test_resume_bf16(tmp_path):
    # CPU autocast to bf16 runs the same kernels in the same order, so resume stays bitwise exact.
    a, b, _, _ = _run_resume_pair(tmp_path, precision="bf16")
    assert a.precision == b.precision == "bf16"
    _assert_same_state(a.spec.models["net"].state_dict(), b.spec.models["net"].state_dict())
    # and autocast was really on: fp32 training ends elsewhere
    fp32 = Trainer(make_spec(validate=None), config(), tmp_path / "fp32")
    fp32.fit()
    sa, sf = a.spec.models["net"].state_dict(), fp32.spec.models["net"].state_dict()
    assert any(not torch.equal(sa[k], sf[k]) for k in sa)


def test_resume_without_optimizer_state_would_differ(tmp_path):
    # The equivalence above is not trivially true: dropping AdamW's moments from the checkpoint
    # (what a resume that only reloads weights would do) changes the final weights.
    a = Trainer(make_spec(), config(), tmp_path / "a")
    a.fit()
    b = Trainer(make_spec(on_step_end=[_kill_at(6)]), config(), tmp_path / "b")
    with pytest.raises(Killed):
        b.fit()
    last = tmp_path / "b" / "checkpoints" / "last.safetensors"
    tensors, record = ckpt.load_checkpoint(last)
    ckpt.save_checkpoint(last, {k: v for k, v in tensors.items() if not k.startswith("optim/")}, record)
    resumed = Trainer(make_spec(), config(), tmp_path / "b")
    resumed.fit(resume=True)
    sa, sb = a.spec.models["net"].state_dict(), resumed.spec.models["net"].state_dict()
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)


def test_training_curve_and_metrics(tmp_path):
    t = Trainer(make_spec(), config(steps=4, val_every=2, checkpoint_every=2), tmp_path)
    summary = t.fit()
    png = tmp_path / "training_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] > 100 and im.size[1] > 100
    rows = read_metrics(tmp_path / "metrics.jsonl")
    train = [r for r in rows if r["kind"] == "train"]
    val = [r for r in rows if r["kind"] == "val"]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in val] == [2, 4]
    assert all(np.isfinite(r["loss"]) and "fg_logit" in r and r["images_per_s"] > 0 for r in train)
    assert all(0.0 <= r["val/dice"] <= 1.0 for r in val)
    assert summary["steps"] == 4 and summary["precision"] == "fp32"
    assert not [p for p in tmp_path.rglob(".tmp-*")]
    record = json.loads((tmp_path / "checkpoints" / "last.json").read_text(encoding="utf-8"))
    assert record["method"] == "test" and record["kind"] == "last" and record["modules"] == ["net"]


def test_log_every_thins_train_rows(tmp_path):
    Trainer(make_spec(validate=None), config(steps=7, log_every=3), tmp_path).fit()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows if r["kind"] == "train"] == [3, 6, 7]  # the last step is always logged


@pytest.mark.parametrize("mode, best_step", [("max", 3), ("min", 2)])
def test_best_checkpoint_follows_monitor(tmp_path, mode, best_step):
    values = iter([0.4, 0.1, 0.9, 0.5, float("nan")])
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def scripted(models):
        return {"val/dice": next(values)}

    spec = make_spec(validate=scripted, mode=mode)
    spec.on_step_end.append(lambda s, _: snapshots.__setitem__(s, {k: v.clone() for k, v in spec.models["net"].state_dict().items()}))
    t = Trainer(spec, config(steps=5, val_every=1, checkpoint_every=5), tmp_path)
    summary = t.fit()
    assert summary["best"]["step"] == best_step
    assert summary["best"]["value"] == {"max": 0.9, "min": 0.1}[mode]
    tensors, record = ckpt.load_checkpoint(tmp_path / "checkpoints" / "best.safetensors")
    assert record["kind"] == "best" and record["step"] == best_step and record["best"]["step"] == best_step
    _assert_same_state(ckpt.group(tensors, "model/net"), snapshots[best_step])
    assert not any(k.startswith("optim/") for k in tensors)


def test_best_checkpoint_holds_ema_weights(tmp_path):
    t = Trainer(make_spec(), config(steps=4, val_every=4, ema_decay=0.5), tmp_path)
    t.fit()
    tensors, _ = ckpt.load_checkpoint(tmp_path / "checkpoints" / "best.safetensors")
    best = ckpt.group(tensors, "model/net")
    shadow = t.ema["net"].state_dict()
    for k, v in shadow.items():
        assert torch.equal(best[k], v), k
    raw = t.spec.models["net"].state_dict()
    assert any(not torch.equal(raw[k], shadow[k]) for k in shadow)  # the raw weights were restored


def test_no_validate_saves_best_each_validation_step(tmp_path):
    Trainer(make_spec(validate=None), config(steps=4, val_every=2), tmp_path).fit()
    record = ckpt.read_record(tmp_path / "checkpoints" / "best.safetensors")
    assert record["step"] == 4 and record["best"] == {"value": None, "step": 4}


def test_non_finite_loss_raises(tmp_path):
    t = Trainer(make_spec(nan_at=2), config(steps=5), tmp_path)
    with pytest.raises(MedalloyError, match="loss became nan at step 2") as exc:
        t.fit()
    assert "\n" not in str(exc.value) and str(tmp_path) in str(exc.value)


def test_resume_without_checkpoint_raises(tmp_path):
    t = Trainer(make_spec(), config(), tmp_path)
    with pytest.raises(MedalloyError, match="nothing to resume") as exc:
        t.fit(resume=True)
    assert str(tmp_path) in str(exc.value)


def test_resume_checkpoint_of_other_method_raises(tmp_path):
    Trainer(make_spec(validate=None), config(steps=2), tmp_path).fit()
    spec = make_spec()
    spec.record["method"] = "other"
    with pytest.raises(MedalloyError, match="'test', not 'other'"):
        Trainer(spec, config(steps=4), tmp_path).fit(resume=True)


@pytest.mark.parametrize("schedule, warmup", [("poly", 0), ("cosine", 2), ("constant", 3)])
def test_lr_follows_schedule(tmp_path, schedule, warmup):
    cfg = config(steps=8, schedule=schedule, warmup_steps=warmup, lr=2e-3)
    spec = make_spec(validate=None)
    seen: list[float] = []
    t = Trainer(spec, cfg, tmp_path)
    spec.on_step_end.append(lambda s, _: seen.append(t.optimizer.param_groups[0]["lr"]))
    t.fit()
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    # row "step" s is logged after the update of 0-based step s - 1
    expected = [2e-3 * lr_factor(s - 1, 8, schedule, warmup) for s in range(1, 9)]
    assert [r["lr"] for r in rows] == pytest.approx(expected, rel=1e-12)
    assert seen == pytest.approx(expected, rel=1e-12)  # the optimiser used those values
    if schedule == "poly":
        assert rows[0]["lr"] == 2e-3 and rows[4]["lr"] == pytest.approx(2e-3 * 0.5**0.9)


def test_lr_scale_and_frozen_modules(tmp_path):
    spec = make_spec(validate=None, frozen=True)
    frozen_before = {k: v.clone() for k, v in spec.models["frozen"].state_dict().items()}
    spec.lr_scale = {"net": 0.5}
    t = Trainer(spec, config(steps=3, schedule="constant", lr=1e-2), tmp_path)
    t.fit()
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(5e-3)
    _assert_same_state(spec.models["frozen"].state_dict(), frozen_before)
    assert all(not p.requires_grad for p in spec.models["frozen"].parameters())
    tensors, _ = ckpt.load_checkpoint(tmp_path / "checkpoints" / "last.safetensors")
    assert tensors and not [k for k in tensors if "frozen" in k]


def test_unknown_trainable_module(tmp_path):
    spec = make_spec()
    spec.trainable = ["net", "ghost"]
    with pytest.raises(MedalloyError, match="ghost"):
        Trainer(spec, config(), tmp_path)


class _Clock:
    """A virtual ``perf_counter``: only the simulated data wait advances it, so budget tests do not
    depend on how busy the machine running them is."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def _sleepy(spec: TrainSpec, seconds: Callable[[int], float], monkeypatch: pytest.MonkeyPatch) -> TrainSpec:
    """The spec's batches, each after a simulated wait that stands for the whole step's time."""
    import types

    from medalloy.engine import trainer as trainer_module

    clock = _Clock()
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    inner = spec.batches

    def slow(step: int, dist: DistInfo) -> dict:
        clock.now += seconds(step)
        return inner(step, dist)

    spec.batches = slow
    return spec


def test_time_budget_fixes_the_step_count_and_the_schedule_still_ends(tmp_path, monkeypatch):
    spec = _sleepy(make_spec(validate=None), lambda step: 0.02, monkeypatch)
    cfg = TrainConfig(steps=100_000, lr=1e-3, time_budget_minutes=0.05, calibration_steps=5, val_every=10**6, progress=False, precision="fp32")
    res = Trainer(spec, cfg, tmp_path).fit()
    # calibration: 5 steps in 0.1 s; 2.91 s (97 % of 3 s) leave room for 140 more
    assert res["steps"] in (144, 145)
    record = ckpt.read_record(tmp_path / "checkpoints" / "last.safetensors")
    assert record["total_steps"] == res["steps"]
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert rows[-1]["step"] == res["steps"]
    # poly decay reached its end at the budgeted step count
    assert rows[-1]["lr"] == pytest.approx(1e-3 * lr_factor(res["steps"] - 1, res["steps"]), rel=1e-6)


def test_time_budget_holds_when_steps_slow_down_after_calibration(tmp_path, monkeypatch):
    # calibration sees 0.01 s steps, the rest take 0.06 s: the first estimate alone (~290 steps)
    # would run ~17 s; re-estimates at each validation step and the hard stop keep it near 3 s
    spec = _sleepy(make_spec(validate=None), lambda step: 0.01 if step < 5 else 0.06, monkeypatch)
    cfg = TrainConfig(steps=100_000, lr=1e-3, time_budget_minutes=0.05, calibration_steps=5, val_every=4, progress=False, precision="fp32")
    res = Trainer(spec, cfg, tmp_path).fit()
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert rows[-1]["step"] == res["steps"] < 60
    assert 2.7 < rows[-1]["time"] <= 3.0 + 0.06 + 1e-9  # the budget used, overshot by one step at most


class _TeacherBN(nn.Module):
    """A frozen teacher whose output depends on its mode: train-mode BatchNorm would use batch
    statistics and update its running ones."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.bn = nn.BatchNorm2d(1)
        with torch.no_grad():
            self.bn.running_mean.fill_(0.5)
            self.bn.running_var.fill_(2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def test_frozen_teacher_stays_in_eval_mode(tmp_path):
    spec = make_spec(validate=dice_validate)
    teacher = _TeacherBN()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    modes: list[bool] = []
    inner = spec.step_fn

    def step_fn(models, batch):
        modes.append(models["teacher"].training)
        hint = models["teacher"](batch["image"])
        out = inner(models, batch)
        return {**out, "loss": out["loss"] + 0.0 * hint.mean()}

    spec.models["teacher"], spec.step_fn = teacher, step_fn
    Trainer(spec, config(steps=6, val_every=3), tmp_path).fit()  # validation in between must not flip modes
    assert modes == [False] * 6
    _assert_same_state(teacher.state_dict(), before)  # running statistics untouched, weights frozen
    assert all(not p.requires_grad for p in teacher.parameters())


def test_frozen_module_sharing_trainable_parameters_is_an_error(tmp_path):
    spec = make_spec()
    spec.models["teacher"] = spec.models["net"].input_block  # would silently freeze the student's first block
    with pytest.raises(MedalloyError, match="frozen module 'teacher' shares .* trainable module 'net'") as exc:
        Trainer(spec, config(), tmp_path)
    assert "\n" not in str(exc.value) and "deepcopy" in str(exc.value)
    assert all(p.requires_grad for p in spec.models["net"].parameters())


def test_validate_without_the_monitored_key_fails_at_the_first_validation(tmp_path):
    calls: list[int] = []

    def wrong(models):
        calls.append(1)
        return {"val/dice_lung": 0.5}

    with pytest.raises(MedalloyError, match="validation returned no 'val/dice' \\(it returned: val/dice_lung\\)"):
        Trainer(make_spec(validate=wrong), config(steps=8, val_every=2), tmp_path).fit()
    assert len(calls) == 1 and not (tmp_path / "checkpoints" / "best.safetensors").exists()


def test_resume_with_weights_of_another_shape_names_file_and_module(tmp_path):
    Trainer(make_spec(validate=None), config(steps=4), tmp_path).fit()
    spec = make_spec(validate=None)
    spec.models["net"] = build_unet(NetworkPlan(kernels=[[3, 3]] * 3, strides=[[1, 1], [2, 2], [2, 2]], filters=[8, 8, 16]), 1, 2)
    with pytest.raises(MedalloyError) as exc:
        Trainer(spec, config(steps=8), tmp_path).fit(resume=True)
    msg = str(exc.value)
    assert "\n" not in msg and "last.safetensors" in msg and "module 'net'" in msg and "size mismatch" in msg


def test_resume_with_ema_missing_from_the_checkpoint_is_an_error(tmp_path):
    Trainer(make_spec(validate=None), config(steps=4), tmp_path).fit()  # no EMA
    with pytest.raises(MedalloyError, match="EMA of module 'net': EMA state lacks") as exc:
        Trainer(make_spec(validate=None), config(steps=8, ema_decay=0.9), tmp_path).fit(resume=True)
    assert "last.safetensors" in str(exc.value)


def test_scalars_are_read_only_at_sync_steps(tmp_path, monkeypatch):
    # Logged values stay on the device between log/validation/checkpoint steps: one reduction per
    # sync step for all scalars together, none on the steps between (no host sync every step).
    from medalloy.engine import trainer as trainer_module

    calls: list[int] = []
    inner = trainer_module.all_reduce_sum

    def counting(value, info):
        calls.append(value.numel())
        return inner(value, info)

    monkeypatch.setattr(trainer_module, "all_reduce_sum", counting)
    seen: list[dict] = []
    spec = make_spec(validate=None, on_step_end=[lambda s, sc: seen.append(sc)])
    Trainer(spec, config(steps=10, log_every=5, val_every=10, checkpoint_every=10), tmp_path).fit()
    assert calls == [5, 5]  # steps 5 and 10; "fg_logit" and "loss" (values, counts) and the non-finite flag in one tensor
    assert [bool(sc) for sc in seen] == [False] * 4 + [True] + [False] * 4 + [True]
    assert set(seen[4]) == {"fg_logit", "loss"}


def test_non_finite_loss_between_log_steps_stops_before_any_checkpoint(tmp_path):
    t = Trainer(make_spec(nan_at=1), config(steps=8, log_every=4, val_every=4, checkpoint_every=4), tmp_path)
    with pytest.raises(MedalloyError, match="loss became nan at step 1"):
        t.fit()
    assert t.step == 4 and not (tmp_path / "checkpoints" / "last.safetensors").exists()


def test_nan_scalars_mean_nothing_to_say_and_are_logged_as_null(tmp_path):
    spec = make_spec(validate=None)
    inner = spec.step_fn
    spec.step_fn = lambda models, batch: {**inner(models, batch), "loss/absent": torch.tensor(float("nan")), "loss/present": torch.tensor(2.0)}
    Trainer(spec, config(steps=2, log_every=1), tmp_path).fit()
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["loss/absent"] for r in rows] == [None, None] and [r["loss/present"] for r in rows] == [2.0, 2.0]
    assert all(np.isfinite(r["loss"]) for r in rows)


def test_images_of_a_step_count_every_part():
    from medalloy.engine.trainer import _batch_size

    parts = [{"image": torch.zeros(5, 1, 4, 4), "one_dataset": 0}, {"image": torch.zeros(2, 1, 8, 8), "one_dataset": 1}]
    assert _batch_size(parts) == 7  # several datasets a step: images/s counts them all
    assert _batch_size((torch.zeros(3, 1), torch.zeros(3))) == 3  # an (input, target) pair: one batch
