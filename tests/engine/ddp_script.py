"""Run by torchrun from test_distributed.py: ``python ddp_script.py OUT MODE``.

MODE ``whole`` | ``kill`` (every rank SIGKILLs itself after step 6) | ``resume``: a tiny U-Net
trained with a frozen BatchNorm teacher and EMA; ``skew``: a time budget where rank 1's
(virtual) clock runs three times as fast as rank 0's. Each rank writes ``rank<R>.json``.
"""

import hashlib
import json
import os
import signal
import sys
import types

import numpy as np
import torch
from torch import nn

from medalloy.engine import trainer as trainer_module
from medalloy.engine.distributed import cleanup
from medalloy.engine.trainer import TrainConfig, Trainer, TrainSpec
from medalloy.losses import DiceCELoss
from medalloy.models import build_unet
from medalloy.planning.plan import NetworkPlan
from medalloy.seeding import seed_everything, step_rng

torch.set_num_threads(1)
out, mode = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])


def digest(state: dict) -> str:
    return hashlib.sha256(b"".join(state[k].detach().cpu().numpy().tobytes() for k in sorted(state))).hexdigest()


class Clock:
    now = 0.0

    def perf_counter(self) -> float:
        return self.now


clock = Clock()
if mode == "skew":
    trainer_module.time = types.SimpleNamespace(perf_counter=clock.perf_counter)


def batches(step, dist):
    clock.now += 0.01 * (1 if dist.rank == 0 else 3)
    rng = step_rng(7, step, dist.rank)
    image = rng.normal(size=(2, 1, 32, 32)).astype(np.float32)
    return {"image": torch.from_numpy(image), "label": torch.from_numpy((image > 0.3).astype(np.int64))}


seed_everything(0)
net = build_unet(NetworkPlan(kernels=[[3, 3]] * 3, strides=[[1, 1], [2, 2], [2, 2]], filters=[4, 8, 16]), 1, 2)
teacher = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.BatchNorm2d(1))
with torch.no_grad():
    teacher[1].running_var.fill_(4.0)
teacher_before = digest(teacher.state_dict())
loss_fn = DiceCELoss()
teacher_modes = []


def step_fn(models, batch):
    teacher_modes.append(models["teacher"].training)
    with torch.no_grad():
        hint = models["teacher"](batch["image"])
    loss = loss_fn(models["net"](batch["image"] + 0.1 * hint), batch["label"])
    return {"loss": loss}


def validate(models):
    return {"val/dice": 0.5}


spec = TrainSpec(models={"net": net, "teacher": teacher}, trainable=["net"], step_fn=step_fn, batches=batches, record={"method": "ddp-test"}, validate=validate)
if mode == "skew":
    cfg = TrainConfig(
        steps=10_000, time_budget_minutes=0.6 / 60, calibration_steps=4, val_every=8, log_every=2, lr=1e-2, progress=False, device="cpu", precision="fp32"
    )
else:
    cfg = TrainConfig(steps=10, val_every=4, checkpoint_every=4, log_every=1, lr=1e-2, ema_decay=0.9, progress=False, device="cpu", precision="fp32")
if mode == "kill":
    spec.on_step_end.append(lambda step, _s: os.kill(os.getpid(), signal.SIGKILL) if step == 6 else None)
trainer = Trainer(spec, cfg, out)
summary = trainer.fit(resume=mode == "resume")
result = {
    "world": trainer.dist.world_size,
    "steps": summary["steps"],
    "net": digest(net.state_dict()),
    "ema": digest(trainer.ema["net"].state_dict()) if trainer.ema else None,
    "teacher_unchanged": digest(teacher.state_dict()) == teacher_before,
    "teacher_modes": sorted(set(teacher_modes)),
    "clock": clock.now,
}
with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
    json.dump(result, fh)
cleanup(trainer.dist)
