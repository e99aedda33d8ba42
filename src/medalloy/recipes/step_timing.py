"""Seconds per training step of an expert's plan on this machine, measured in a few seconds and
cached per machine, for the budget planner (:mod:`medalloy.planning.budget`).

The step is the expert's: the plan's DynUNet at its patch and batch, Dice + CE (deep supervision
where the plan has it), forward, backward and an AdamW update, in the precision the engine would
use here (bf16 autocast on a CPU with bf16 units or a GPU that has them). The median of a few steps
after warm-up; the cache key is the machine (CPU model, cores, torch version and threads, device)
and the step's shape, never a dataset, so a plan's step is measured once per machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from pathlib import Path

import torch

from medalloy.jsonio import write_text_atomic
from medalloy.planning.plan import Plan

CACHE_ENV = "MEDALLOY_CACHE"


def cache_file() -> Path:
    """``$MEDALLOY_CACHE/step_times.json``, else ``~/.cache/medalloy/step_times.json``."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "medalloy")
    return root / "step_times.json"


def machine_description(device: str) -> str:
    from medalloy.engine.machine import cpu_model

    cpu = cpu_model()
    gpu = f", {torch.cuda.get_device_name(0)}" if device.startswith("cuda") and torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} on {torch.get_num_threads()} threads, {device}{gpu}"


def _key(plan: Plan, device: str, precision: str) -> str:
    shape = {
        "in": plan.in_channels, "out": len(plan.label_values), "patch": plan.patch_size, "batch": plan.batch_size,
        "network": plan.network.model_dump(), "precision": precision, "machine": machine_description(device),
    }  # fmt: skip
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:24]


def _precision(device: str) -> str:
    from medalloy.engine.precision import cpu_supports_bf16

    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def measure_step_seconds(plan: Plan, device: str = "cpu", steps: int = 3, warmup: int = 1) -> float:
    """Median seconds of ``steps`` expert training steps of ``plan`` (after ``warmup``), uncached."""
    from medalloy.recipes.expert import ExpertSpec, build_expert, expert_loss

    torch.manual_seed(0)
    model = build_expert(ExpertSpec.of_plan(plan)).to(device).train()
    loss_fn = expert_loss(plan)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(plan.batch_size, plan.in_channels, *plan.patch_size, device=device)
    y = torch.randint(0, len(plan.label_values), (plan.batch_size, 1, *plan.patch_size), device=device)
    precision = _precision(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return float(statistics.median(times))


def step_seconds(device: str = "cpu", cache: Path | None = None, measure=None):
    """A ``plan -> seconds`` function for the budget planner: the cached time, else measured now and
    added to the cache (written atomically; a cache that cannot be read is measured afresh)."""
    path = cache or cache_file()

    def seconds(plan: Plan) -> float:
        key = _key(plan, device, _precision(device))
        try:
            known = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            known = {}
        if key not in known:
            known[key] = round((measure or measure_step_seconds)(plan, device), 5)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps(known, indent=0, sort_keys=True) + "\n")
        return float(known[key])

    return seconds


def budget_timing(device_name: str) -> dict[str, object]:
    """What the budget planner takes from this machine: ``step_seconds`` (cached) and ``machine``
    (its description), for ``device_name`` as the commands give it (``auto``, ``cpu``, ``cuda:N``)."""
    from medalloy.engine.distributed import resolve_device

    device = str(resolve_device(device_name))
    return {"step_seconds": step_seconds(device), "machine": machine_description(device)}
