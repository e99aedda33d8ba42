"""DistributedDataParallel set-up: the same script runs alone or under ``torchrun --nproc_per_node=N``.

Rules every caller follows (docs/design.md, "Several processes"):

- each rank owns one device: ``cuda:LOCAL_RANK`` on GPUs (NCCL), the CPU otherwise (gloo);
- collectives are called by every rank at the same step, never under a condition that only one
  rank can evaluate (its own clock, its own file system view): rank 0 decides, the others follow;
- tensors handed to a collective live on the rank's device (NCCL cannot reduce CPU tensors);
- only rank 0 writes the run folder; :func:`from_main` runs such work there and hands its result,
  or its error, to every rank, so a refused ``--out`` stops all ranks with one message.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from medalloy.errors import MedalloyError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def world_from_env() -> tuple[int, int]:
    """``(world_size, local_rank)`` as torchrun describes them (``(1, 0)`` outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(name: str) -> torch.device:
    """``auto``/``cuda`` -> this rank's GPU (``cuda:LOCAL_RANK``) when CUDA is there, else the CPU;
    an explicit ``cuda:K`` or ``cpu`` is kept. Under torchrun every rank must own its own GPU:
    a bare ``cuda`` would put every rank on GPU 0."""
    world, local_rank = world_from_env()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if world > 1 else 0)
        if device.index >= torch.cuda.device_count():
            raise MedalloyError(
                f"rank {local_rank} of {world} needs GPU {device.index}, but this machine has {torch.cuda.device_count()}",
                fix="start at most one process per GPU (torchrun --nproc-per-node), or train on the CPU with --device cpu",
            )
    return device


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group that torchrun describes in the environment (gloo on CPU, NCCL on GPU)."""
    world, local_rank = world_from_env()
    if world <= 1:
        return DistInfo()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's object collectives use the current device
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # Ranks wait in a collective while rank 0 validates or writes checkpoints: allow long ones.
        minutes = float(os.environ.get("MEDALLOY_DIST_TIMEOUT_MINUTES", "60"))
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=minutes))
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


def current() -> DistInfo:
    """The process group already joined (or a single process)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=world_from_env()[1])
    return DistInfo()


def ddp_options(device: torch.device, find_unused_parameters: bool = False) -> dict[str, Any]:
    """Keyword arguments of ``DistributedDataParallel`` for a module on ``device``."""
    if device.type == "cuda":
        return {"device_ids": [device.index], "output_device": device.index, "find_unused_parameters": find_unused_parameters}
    return {"device_ids": None, "find_unused_parameters": find_unused_parameters}


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, info: DistInfo, src: int = 0):
    """Send a picklable object from rank ``src`` to all ranks (used for small control values only)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_int(value: int, info: DistInfo, device: torch.device) -> int:
    """Rank 0's ``value`` on every rank; one tensor on the rank's device, no pickling."""
    if not info.enabled:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return int(t.item())


def _all_reduce(value: torch.Tensor, info: DistInfo, op) -> torch.Tensor:
    """A reduced copy over ranks of a tensor on the rank's device (the input is left alone)."""
    if not info.enabled:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=op)
    return out


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    return _all_reduce(value, info, dist.ReduceOp.SUM) / info.world_size if info.enabled else value


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    return _all_reduce(value, info, dist.ReduceOp.SUM)


def all_reduce_min(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    return _all_reduce(value, info, dist.ReduceOp.MIN)


def from_main(fn: Callable[[], T], info: DistInfo) -> T:
    """``fn()`` on rank 0 only, its result sent to every rank. A :class:`MedalloyError` raised there
    is raised on every rank (marked ``from_main`` so only rank 0 prints it) instead of leaving
    the other ranks waiting for a result that never comes."""
    if not info.enabled:
        return fn()
    box: list[Any] = [None]
    if info.is_main:
        try:
            box[0] = ("ok", fn())
        except MedalloyError as exc:
            box[0] = ("error", str(exc))
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        err = MedalloyError(value)
        err.from_main = True  # type: ignore[attr-defined]
        raise err
    return value


def cleanup(info: DistInfo | None = None) -> None:
    if dist.is_available() and dist.is_initialized():
        # every rank done with its last collective before any tears gloo down: a rank destroying its
        # group while its peer still talks to it aborted with "terminate called without an active
        # exception" (seen in CI, test_ddp_frozen_teacher_ema_kill_and_resume)
        try:
            dist.barrier()
        except RuntimeError:  # a peer already gone: nothing left to wait for
            pass
        dist.destroy_process_group()
