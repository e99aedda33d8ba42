"""DDP smoke test: two CPU processes under torchrun (gloo) train a tiny U-Net with the Trainer."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from medalloy.engine import checkpoint as ckpt
from medalloy.engine.distributed import DistInfo, all_reduce_mean, broadcast_object, init_distributed
from medalloy.engine.logging import read_metrics
from medalloy.errors import MedalloyError

SCRIPT = textwrap.dedent(
    '''
    """Run by torchrun: each rank trains on its own batches; rank 0 writes the checkpoints."""
    import hashlib
    import json
    import os
    import sys

    import numpy as np
    import torch

    from medalloy.engine.distributed import cleanup
    from medalloy.seeding import seed_everything, step_rng
    from medalloy.engine.trainer import TrainConfig, Trainer, TrainSpec
    from medalloy.losses import DiceCELoss
    from medalloy.models import build_unet
    from medalloy.planning.plan import NetworkPlan

    torch.set_num_threads(1)
    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    seen, local_losses = [], []

    def batches(step, dist):
        rng = step_rng(7, step, dist.rank)
        image = rng.normal(size=(2, 1, 32, 32)).astype(np.float32)
        seen.append(hashlib.sha256(image.tobytes()).hexdigest())
        return {"image": torch.from_numpy(image), "label": torch.from_numpy((image > 0.3).astype(np.int64))}

    loss_fn = DiceCELoss()

    def step_fn(models, batch):
        loss = loss_fn(models["net"](batch["image"]), batch["label"])
        local_losses.append(float(loss))
        return {"loss": loss}

    def validate(models):
        return {"val/dice": 0.5}

    seed_everything(0)
    net = build_unet(NetworkPlan(kernels=[[3, 3]] * 3, strides=[[1, 1], [2, 2], [2, 2]], filters=[4, 8, 16]), 1, 2)
    spec = TrainSpec(models={"net": net}, trainable=["net"], step_fn=step_fn, batches=batches, record={"method": "ddp-test"}, validate=validate)
    cfg = TrainConfig(steps=4, val_every=2, checkpoint_every=2, log_every=1, lr=1e-2, progress=False, device="cpu", precision="fp32")
    trainer = Trainer(spec, cfg, out)
    summary = trainer.fit()
    state = net.state_dict()
    digest = hashlib.sha256(b"".join(state[k].numpy().tobytes() for k in sorted(state))).hexdigest()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump({"world": trainer.dist.world_size, "batches": seen, "losses": local_losses, "final": digest, "steps": summary["steps"]}, fh)
    cleanup(trainer.dist)
    '''
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_training(tmp_path):
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT, encoding="utf-8")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}", str(script), str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    last = out / "checkpoints" / "last.safetensors"
    tensors, record = ckpt.load_checkpoint(last, method="ddp-test")
    assert record["step"] == 4 and record["best"]["step"] == 2  # first of two equal val values
    assert (out / "checkpoints" / "best.safetensors").exists()
    ranks = [json.loads((out / f"rank{r}.json").read_text(encoding="utf-8")) for r in (0, 1)]
    assert all(r["world"] == 2 and r["steps"] == 4 for r in ranks)
    # different data on each rank, step by step
    assert all(len(r["batches"]) == 4 for r in ranks)
    assert all(a != b for a, b in zip(ranks[0]["batches"], ranks[1]["batches"]))
    # identical weights at the end (DDP averaged the gradients), equal to rank 0's checkpoint
    assert ranks[0]["final"] == ranks[1]["final"]
    state = ckpt.group(tensors, "model/net")
    digest = hashlib.sha256(b"".join(state[k].numpy().tobytes() for k in sorted(state))).hexdigest()
    assert digest == ranks[0]["final"]
    # the logged loss is the mean over ranks
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for i, row in enumerate(rows):
        mean = (ranks[0]["losses"][i] + ranks[1]["losses"][i]) / 2
        assert row["loss"] == pytest.approx(mean, rel=1e-5)
    assert ranks[0]["losses"] != ranks[1]["losses"]
    assert not list(out.rglob(".tmp-*"))


def test_single_process_helpers_are_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed(torch.device("cpu"))
    assert info == DistInfo() and info.is_main and not info.enabled
    x = torch.tensor([1.0, 3.0])
    assert torch.equal(all_reduce_mean(x, info), x)
    assert broadcast_object({"a": 1}, info) == {"a": 1}
    assert DistInfo(rank=1, world_size=2).enabled and not DistInfo(rank=1, world_size=2).is_main


DDP_SCRIPT = Path(__file__).with_name("ddp_script.py")


def _ddp(out: Path, mode: str, cwd: Path) -> subprocess.CompletedProcess:
    from subprocs import run, torchrun

    return run(torchrun(str(DDP_SCRIPT), str(out), mode), cwd, timeout=180)


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text(encoding="utf-8")) for r in (0, 1)]


@pytest.mark.slow
def test_ddp_frozen_teacher_ema_kill_and_resume(tmp_path):
    # Two ranks, a frozen BatchNorm teacher and EMA; one run whole, one SIGKILL-ed on every rank
    # after step 6 (checkpoint at 4) and resumed: the same weights on both ranks and in both runs.
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    proc = _ddp(whole, "whole", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed = _ddp(broken, "kill", tmp_path)
    assert killed.returncode != 0 and not (broken / "rank0.json").exists()
    assert ckpt.read_record(broken / "checkpoints" / "last.safetensors")["step"] == 4
    resumed = _ddp(broken, "resume", tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _ranks(whole), _ranks(broken)
    assert [r["steps"] for r in a + b] == [10] * 4 and all(r["world"] == 2 for r in a + b)
    assert len({r["net"] for r in a + b}) == 1 and len({r["ema"] for r in a + b}) == 1
    assert all(r["teacher_unchanged"] and r["teacher_modes"] == [False] for r in a + b)
    ta, _ = ckpt.load_checkpoint(whole / "checkpoints" / "last.safetensors")
    tb, _ = ckpt.load_checkpoint(broken / "checkpoints" / "last.safetensors")
    assert sorted(ta) == sorted(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not [k for k in ta if "teacher" in k]  # frozen modules are not saved


@pytest.mark.slow
def test_ddp_time_budget_follows_rank0_clock(tmp_path):
    # Rank 1's clock runs 3x fast: by its own clock it would stop after a third of rank 0's steps
    # and leave rank 0 waiting in a collective. Rank 0 decides; both stop at the same step.
    out = tmp_path / "skew"
    proc = _ddp(out, "skew", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = _ranks(out)
    assert r0["steps"] == r1["steps"] and r0["net"] == r1["net"]
    assert r1["clock"] == pytest.approx(3 * r0["clock"])
    # rank 0's clock: 0.01 s a step, 0.6 s budget (97% planned) -> about 58 steps, not rank 1's ~19
    assert 50 <= r0["steps"] <= 60
    record = ckpt.read_record(out / "checkpoints" / "last.safetensors")
    assert record["step"] == record["total_steps"] == r0["steps"]


def test_each_rank_gets_its_own_gpu(monkeypatch):
    from medalloy.engine.distributed import ddp_options, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit index is the user's choice
    assert resolve_device("cpu") == torch.device("cpu")
    opts = ddp_options(torch.device("cuda", 1), find_unused_parameters=True)
    assert opts == {"device_ids": [1], "output_device": 1, "find_unused_parameters": True}
    assert ddp_options(torch.device("cpu"))["device_ids"] is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


def test_more_ranks_than_gpus_is_one_line(monkeypatch):
    from medalloy.engine.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(MedalloyError, match="rank 1 of 2 needs GPU 1, but this machine has 1") as err:
        resolve_device("auto")
    assert "--device cpu" in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_device("auto") == torch.device("cuda", 0)


def test_from_main_hands_rank0s_result_alone():
    from medalloy.engine.distributed import from_main

    assert from_main(lambda: {"plan": 1}, DistInfo()) == {"plan": 1}
