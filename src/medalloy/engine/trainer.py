"""The one training loop every medalloy method uses.

A recipe describes *what* to train with a :class:`TrainSpec` (modules, which of them learn, a step
function returning losses, a batch source, an optional validation); :class:`Trainer` does the rest:
optimiser and LR schedule, mixed precision, gradient clipping, EMA, DDP, validation, best/last
checkpoints, ``--resume``, progress bar, ``metrics.jsonl`` and a training-curve PNG.

Batches are a pure function of the step (``batches(step, dist_info)``), and so are the random state
a step starts with (dropout) and the schedule, so a run killed after its checkpoint at step N and
resumed reaches the same weights as a run that was never interrupted.

Logged scalars stay on the device until a *sync step* (a log, validation or checkpoint step, or
the last one): only then are they reduced over ranks and read, so an ordinary step never waits
for the device. A non-finite loss is noticed at the next sync step, by every rank at once, before
any checkpoint could hold its weights.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from medalloy.engine import checkpoint as ckpt
from medalloy.engine.distributed import (
    DistInfo,
    all_reduce_min,
    all_reduce_sum,
    barrier,
    broadcast_int,
    ddp_options,
    from_main,
    init_distributed,
    resolve_device,
)
from medalloy.engine.ema import EMA
from medalloy.engine.logging import MetricsLog, plot_curves
from medalloy.engine.precision import autocast, resolve_precision
from medalloy.engine.schedule import lr_factor
from medalloy.errors import MedalloyError
from medalloy.seeding import step_seed


class TrainConfig(BaseModel):
    """Engine settings shared by every recipe (a recipe adds its own fields next to these)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(1000, ge=1, description="optimizer steps (with a time budget: at most)")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(3e-5, ge=0)
    momentum: float = 0.99
    schedule: Literal["poly", "cosine", "constant"] = "poly"
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = 12.0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast dtype; auto: bf16 where the device has it, else fp16 on a GPU, fp32 on a CPU"
    )
    ema_decay: float | None = None
    val_every: int = Field(250, ge=1)
    checkpoint_every: int | None = None
    log_every: int = Field(10, ge=1)
    seed: int = Field(0, description="seed of the weights, the sampling and the augmentation")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1 ...")
    # On a GPU: cuDNN's deterministic convolutions (as MONAI's set_determinism), so a seeded run
    # repeats and resumes the same; false lets cuDNN pick the fastest algorithm (nnU-Net's choice).
    deterministic: bool = True
    progress: bool = True
    # Wall-clock budget: after `calibration_steps` the step count is set to what fits the budget
    # (at most `steps`) and re-estimated at each validation from wall-clock time (validations
    # included), so the schedule still decays to its end; past the budget the run stops.
    # A resumed run keeps the step count of its checkpoint.
    time_budget_minutes: float | None = Field(None, gt=0)
    calibration_steps: int = Field(20, ge=2)


@dataclass
class TrainSpec:
    """What a recipe hands the engine.

    - ``models``: every module the step uses, trainable or frozen (frozen ones are not saved);
    - ``trainable``: names of the modules the optimiser updates and checkpoints hold;
    - ``step_fn(models, batch) -> {"loss": tensor, ...}``: other entries are logged as scalars;
    - ``batches(step, dist) -> batch``: deterministic in ``step`` (and rank), tensors anywhere in it
      are moved to the device by the engine;
    - ``validate(models) -> {"val/<name>": float}``: run on rank 0 with averaged weights when EMA is on;
    - ``record``: what the checkpoint says about itself (``method``, ``tasks``, ``plan``, ...);
    - ``find_unused_parameters``: for DDP, when a step does not use every trainable parameter
      (e.g. branches taken per task); costs a graph traversal per step, so off by default;
    - ``on_step_end(step, scalars)``: ``scalars`` holds the reduced floats at sync steps, else is empty.

    ``step_fn`` returns the same keys at every step on every rank (they are reduced together).
    """

    models: dict[str, nn.Module]
    trainable: list[str]
    step_fn: Callable[[dict[str, nn.Module], Any], dict[str, torch.Tensor]]
    batches: Callable[[int, DistInfo], Any]
    record: dict[str, Any]
    validate: Callable[[dict[str, nn.Module]], dict[str, float]] | None = None
    monitor: str = "val/dice"
    mode: Literal["max", "min"] = "max"
    lr_scale: dict[str, float] = field(default_factory=dict)
    on_step_end: list[Callable[[int, dict[str, float]], None]] = field(default_factory=list)
    find_unused_parameters: bool = False


_NO_STEP = 2**62  # "no non-finite loss seen yet"


def check_frozen_sharing(models: dict[str, nn.Module], trainable: list[str]) -> None:
    """A frozen module must not hold a trainable module's parameters: freezing it would silently
    freeze them too (a teacher built as ``student.encoder``, say)."""
    owner = {id(p): n for n in trainable for p in models[n].parameters()}
    for name, module in models.items():
        if name in trainable:
            continue
        shared = [(pn, owner[id(p)]) for pn, p in module.named_parameters() if id(p) in owner]
        if shared:
            raise MedalloyError(
                f"frozen module '{name}' shares {len(shared)} parameters ({shared[0][0]}, ...) with trainable module '{shared[0][1]}'",
                fix="give the frozen module its own copy (copy.deepcopy) or list it among the trainable modules",
            )


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Optimizer state as flat tensors (``optim/<param index>/<key>``) plus JSON-able groups."""
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"optim/{idx}/{key}"] = t
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in ckpt.group(tensors, "optim").items():
        idx, name = key.split("/", 1)
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": groups})


class Trainer:
    """Runs a :class:`TrainSpec` for ``config.steps`` steps, writing into ``out_dir``."""

    def __init__(self, spec: TrainSpec, config: TrainConfig, out_dir: str | Path):
        self.spec = spec
        self.cfg = config
        self.out = Path(out_dir)
        self.device = resolve_device(config.device)
        self.dist = init_distributed(self.device)
        self.precision = resolve_precision(config.precision, self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.deterministic = config.deterministic
            torch.backends.cudnn.benchmark = not config.deterministic
        missing = [n for n in spec.trainable if n not in spec.models]
        if missing:
            raise MedalloyError(f"trainable modules {missing} not among the models {list(spec.models)}")
        check_frozen_sharing(spec.models, spec.trainable)
        for name, module in spec.models.items():
            module.to(self.device)
            if name not in spec.trainable:
                module.eval()
                for p in module.parameters():
                    p.requires_grad_(False)
        self.ema = {n: EMA(spec.models[n], config.ema_decay) for n in spec.trainable} if config.ema_decay else {}
        self.wrapped = dict(spec.models)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            for n in spec.trainable:
                self.wrapped[n] = DDP(spec.models[n], **ddp_options(self.device, spec.find_unused_parameters))
        self.optimizer = self._make_optimizer()
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.step = 0
        self.total_steps = config.steps
        self.best: dict[str, Any] = {"value": None, "step": None}
        self._first_bad = torch.tensor(_NO_STEP, device=self.device)
        self._bad_loss = torch.zeros((), device=self.device)

    # -- set-up ----------------------------------------------------------------------------
    def _make_optimizer(self) -> torch.optim.Optimizer:
        groups = []
        for n in self.spec.trainable:
            params = [p for p in self.spec.models[n].parameters() if p.requires_grad]
            scale = self.spec.lr_scale.get(n, 1.0)
            groups.append({"params": params, "lr": self.cfg.lr * scale, "base_lr": self.cfg.lr * scale, "name": n})
        if self.cfg.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=self.cfg.lr, momentum=self.cfg.momentum, nesterov=True, weight_decay=self.cfg.weight_decay)
        return torch.optim.AdamW(groups, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    # -- checkpoints -----------------------------------------------------------------------
    def _record(self, kind: str) -> dict[str, Any]:
        return {
            **self.spec.record,
            "kind": kind,
            "step": self.step,
            "total_steps": self.total_steps,
            "best": self.best,
            "train_config": self.cfg.model_dump(mode="json"),
            "precision": self.precision,
            "modules": list(self.spec.trainable),
            "ema": bool(self.ema),
        }

    def save_last(self) -> None:
        if not self.dist.is_main:
            return
        tensors: dict[str, torch.Tensor] = {}
        for n in self.spec.trainable:
            tensors.update(ckpt.prefixed(self.spec.models[n].state_dict(), f"model/{n}"))
        for n, e in self.ema.items():
            tensors.update(ckpt.prefixed(e.state_dict(), f"ema/{n}"))
        opt_tensors, groups = _optimizer_tensors(self.optimizer)
        tensors.update(opt_tensors)
        record = self._record("last")
        record["optimizer_groups"] = groups
        ckpt.save_checkpoint(self.ckpt_dir / "last.safetensors", tensors, record)

    def save_best(self) -> None:
        """The weights to deploy: averaged ones when EMA is on."""
        if not self.dist.is_main:
            return
        tensors: dict[str, torch.Tensor] = {}
        for n in self.spec.trainable:
            state = self.spec.models[n].state_dict()
            if n in self.ema:
                state = {**state, **self.ema[n].state_dict()}
            tensors.update(ckpt.prefixed(state, f"model/{n}"))
        ckpt.save_checkpoint(self.ckpt_dir / "best.safetensors", tensors, self._record("best"))

    def load_last(self) -> None:
        path = self.ckpt_dir / "last.safetensors"
        if not path.exists():
            raise MedalloyError("nothing to resume: no checkpoints/last.safetensors", self.out, "start without --resume")
        tensors, record = ckpt.load_checkpoint(path, method=self.spec.record.get("method"), map_location=str(self.device))
        for n in self.spec.trainable:
            state = ckpt.group(tensors, f"model/{n}")
            if not state:
                raise MedalloyError(f"checkpoint holds no weights for module '{n}'", path, "resume a run of the same recipe")
            ckpt.load_module_state(self.spec.models[n], state, path, n, "resume with the settings the run was started with")
        for n, e in self.ema.items():
            try:
                e.load_state_dict(ckpt.group(tensors, f"ema/{n}"))
            except ValueError as exc:
                raise MedalloyError(f"EMA of module '{n}': {exc}", path, "resume with the ema_decay setting the run was started with") from None
        _load_optimizer(self.optimizer, tensors, record["optimizer_groups"])
        self.step = int(record["step"])
        self.total_steps = int(record.get("total_steps", self.cfg.steps))
        self.best = record.get("best", self.best)

    # -- loop ------------------------------------------------------------------------------
    def _set_lr(self) -> float:
        f = lr_factor(self.step, self.total_steps, self.cfg.schedule, self.cfg.warmup_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * f
        return self.optimizer.param_groups[0]["lr"]

    def _train_step(self, batch: Any) -> dict[str, torch.Tensor]:
        """One update; returns the step's scalars as detached device tensors (no host sync)."""
        for n in self.spec.trainable:
            self.wrapped[n].train()
        # Randomness inside the step (dropout) is a pure function of (seed, step, rank) too, so a
        # resumed run draws what the uninterrupted one drew.
        torch.manual_seed(step_seed(self.cfg.seed, "step", self.step, self.dist.rank))
        with autocast(self.precision, self.device):
            out = self.spec.step_fn(self.wrapped, batch)
        loss = out["loss"]
        with torch.no_grad():
            new_bad = (~torch.isfinite(loss.detach())) & (self._first_bad == _NO_STEP)
            self._first_bad = torch.where(new_bad, torch.full_like(self._first_bad, self.step), self._first_bad)
            self._bad_loss = torch.where(new_bad, loss.detach().float(), self._bad_loss)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.cfg.grad_clip:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        for n, e in self.ema.items():
            e.update(self.spec.models[n])
        return {k: v.detach().float().reshape(()) for k, v in out.items() if isinstance(v, torch.Tensor) and v.numel() == 1}

    def _sync_scalars(self, scalars: dict[str, torch.Tensor]) -> dict[str, float | None]:
        """Mean over ranks of the step's scalars, read once (one collective for all of them); raises
        on every rank together if any rank saw a non-finite loss since the last sync.

        A NaN scalar means "nothing to say this step" (a dataset absent from the batch): it is
        averaged over the ranks that have a value, and logged as null when none has."""
        keys = sorted(scalars)
        packed = torch.stack([scalars[k].to(self.device) for k in keys]) if keys else torch.zeros(0, device=self.device)
        have = ~torch.isnan(packed)
        bad = (self._first_bad != _NO_STEP).float().reshape(1)  # ranks that saw a non-finite loss
        sums = all_reduce_sum(torch.cat([torch.where(have, packed, torch.zeros_like(packed)), have.float(), bad]), self.dist)
        n = len(keys)
        read = sums.tolist()  # the one host read of an ordinary sync step
        if read[-1] > 0:  # every rank sees the same sum, so all raise together
            first_bad = int(all_reduce_min(self._first_bad, self.dist).item())
            value = float(self._bad_loss.item()) if int(self._first_bad.item()) == first_bad else float("nan")
            raise MedalloyError(f"loss became {value} at step {first_bad}", self.out, "lower the learning rate or check the data for NaN/extreme values")
        values = [s / c if c > 0 else None for s, c in zip(read[:n], read[n : 2 * n])]
        return dict(zip(keys, values))

    def _validate_here(self) -> dict[str, float]:
        for n in self.spec.trainable:
            self.spec.models[n].eval()
        with contextlib.ExitStack() as stack:
            for n, e in self.ema.items():
                stack.enter_context(e.applied(self.spec.models[n]))
            with torch.inference_mode():
                metrics = self.spec.validate(self.spec.models)
        if not isinstance(metrics, dict) or self.spec.monitor not in metrics:
            got = ", ".join(sorted(metrics)) if isinstance(metrics, dict) else type(metrics).__name__
            raise MedalloyError(
                f"validation returned no '{self.spec.monitor}' (it returned: {got or 'nothing'})",
                self.out,
                "return the monitored metric from validate, or set TrainSpec.monitor to one it returns",
            )
        return metrics

    def _validate(self) -> dict[str, float]:
        """Rank 0 validates; every rank gets its metrics (or its error) at the same step."""
        if self.spec.validate is None:
            return {}
        return from_main(self._validate_here, self.dist)

    def _budget_proposal(self, elapsed: float, start_step: int, mark: tuple[int, float] | None) -> tuple[int, tuple[int, float] | None]:
        """The step count that fits the rest of the time budget by this rank's clock, and the
        calibration mark.

        First after ``calibration_steps`` (time per step so far), then at every validation step
        (wall-clock time per step since the first estimate, so validations and checkpoints count).
        3% is kept for the final validation and checkpoint; past the budget the run stops here."""
        budget = self.cfg.time_budget_minutes * 60.0
        done = self.step - start_step
        if elapsed >= budget:
            total = self.step
        elif mark is None and done >= self.cfg.calibration_steps:
            mark = (self.step, elapsed)
            total = self.step + int((budget * 0.97 - elapsed) / max(elapsed / done, 1e-9))
        elif mark is not None and self.step % self.cfg.val_every == 0 and self.step > mark[0]:
            per_step = (elapsed - mark[1]) / (self.step - mark[0])
            total = self.step + int((budget * 0.97 - elapsed) / max(per_step, 1e-9))
        else:
            return self.total_steps, mark
        return max(self.step, min(self.cfg.steps, total)), mark

    def _is_sync_step(self, every_ckpt: int) -> bool:
        s = self.step
        return s % self.cfg.log_every == 0 or s % self.cfg.val_every == 0 or s % every_ckpt == 0 or s >= self.total_steps

    def _is_better(self, value: float) -> bool:
        if value is None or not math.isfinite(value):
            return False
        if self.best.get("value") is None:
            return True
        return value > self.best["value"] if self.spec.mode == "max" else value < self.best["value"]

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train to ``config.steps``; returns a summary (steps, best, seconds, images/s)."""
        if resume:
            self.load_last()
        log = MetricsLog(self.out / "metrics.jsonl", resume_step=self.step if resume else None) if self.dist.is_main else None
        every_ckpt = self.cfg.checkpoint_every or self.cfg.val_every
        bar = None
        if self.dist.is_main and self.cfg.progress:
            import sys

            from tqdm.auto import tqdm

            # Outside a terminal (CI logs, files) a bar line every few seconds would flood the log.
            interval = 1.0 if sys.stderr.isatty() else 30.0
            bar = tqdm(
                total=self.total_steps, initial=self.step, desc=self.spec.record.get("name", "train"), unit="step", dynamic_ncols=True, mininterval=interval
            )
        t_start, data_time, compute_time, images = time.perf_counter(), 0.0, 0.0, 0
        start_step = self.step
        budget_mark: tuple[int, float] | None = None
        budgeted = bool(self.cfg.time_budget_minutes) and not resume
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            batch = to_device(self.spec.batches(self.step, self.dist), self.device)
            t1 = time.perf_counter()
            lr = self._set_lr()
            device_scalars = self._train_step(batch)
            t2 = time.perf_counter()
            data_time += t1 - t0
            compute_time += t2 - t1
            images += _batch_size(batch)
            self.step += 1
            if budgeted:
                proposal, budget_mark = self._budget_proposal(time.perf_counter() - t_start, start_step, budget_mark)
                # Rank 0's clock decides, at steps every rank recognises (every step when alone,
                # sync steps under DDP), so no rank can leave the loop while another waits in a collective.
                if not self.dist.enabled or self._is_sync_step(every_ckpt):
                    total = broadcast_int(proposal, self.dist, self.device) if self.dist.enabled else proposal
                    if total != self.total_steps:
                        self.total_steps = total
                        if bar is not None:
                            bar.total = total
                            bar.refresh()
            if not self._is_sync_step(every_ckpt):
                if bar is not None:
                    bar.update(1)
                for cb in self.spec.on_step_end:
                    cb(self.step, {})
                continue
            scalars = self._sync_scalars(device_scalars)
            row = {"kind": "train", "step": self.step, "lr": lr, **scalars}
            if log is not None and (self.step % self.cfg.log_every == 0 or self.step == self.total_steps):
                elapsed = data_time + compute_time
                log.write(
                    {
                        **row,
                        "images_per_s": images * self.dist.world_size / max(elapsed, 1e-9),
                        "data_fraction": data_time / max(elapsed, 1e-9),
                        "time": round(time.perf_counter() - t_start, 3),
                    }
                )
            if bar is not None:
                bar.update(1)
                loss = scalars.get("loss")
                bar.set_postfix(loss="-" if loss is None else f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            if self.step % self.cfg.val_every == 0 or self.step == self.total_steps:
                metrics = self._validate()  # every rank holds rank 0's metrics, so all agree on `best`
                if metrics:
                    if log is not None:
                        log.write({"kind": "val", "step": self.step, **metrics})
                    value = metrics.get(self.spec.monitor)
                    if self._is_better(value):
                        self.best = {"value": value, "step": self.step, "metrics": metrics}
                        self.save_best()
                    if bar is not None:
                        bar.write(f"step {self.step}: " + ", ".join(f"{k[4:]}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
                elif self.spec.validate is None:
                    self.best = {"value": None, "step": self.step}
                    self.save_best()
            if self.step % every_ckpt == 0 or self.step == self.total_steps:
                self.save_last()
                if log is not None:
                    plot_curves(log.rows(), self.out / "training_curve.png", title=self.spec.record.get("name", ""))
                barrier(self.dist)
            for cb in self.spec.on_step_end:
                cb(self.step, scalars)
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - t_start
        return {
            "steps": self.step,
            "best": self.best,
            "seconds": seconds,
            "images_per_s": images * self.dist.world_size / max(data_time + compute_time, 1e-9),
            "data_fraction": data_time / max(data_time + compute_time, 1e-9),
            "precision": self.precision,
        }


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, dict):
        for v in batch.values():
            if isinstance(v, torch.Tensor) and v.ndim > 0:
                return int(v.shape[0])
    if isinstance(batch, list) and batch and all(isinstance(b, dict) for b in batch):  # the parts of one step
        return sum(_batch_size(b) for b in batch)
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_size(batch[0])
    return 0
