"""Helpers for tests that run medalloy in other processes (torchrun, a real SIGKILL)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
KILL_AT_STEP = HERE / "kill_at_step.py"
TIME_FIELDS = ("images_per_s", "data_fraction", "time")


def clean_env() -> dict[str, str]:
    """The parent's environment without torchrun's variables, one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK"):
        env.pop(key, None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    """``torchrun --nproc_per_node=N ARGS`` on a free local port (gloo on CPU)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args]


def medalloy(*args: str) -> list[str]:
    return [sys.executable, "-m", "medalloy", "--threads", "1", "-q", *args]


def killed_at(step: int, *args: str) -> list[str]:
    """The medalloy CLI with ``args``, SIGKILL-ed by itself right after training step ``step``."""
    return [sys.executable, str(KILL_AT_STEP), str(step), "--threads", "1", "-q", *args]


def run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=timeout, cwd=cwd)


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def rows_without_time(path: Path) -> list[dict]:
    from medalloy.engine.logging import read_metrics

    return [{k: v for k, v in r.items() if k not in TIME_FIELDS} for r in read_metrics(path)]
