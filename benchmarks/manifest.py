"""What ran, where and when: the manifest written beside each benchmark arm's results.

A manifest names the arm's config by content (sha256 of its file; the variables it was given
beside it), the code (commit, and whether the tree had uncommitted changes), medalloy's version, the
machine (CPU model, cores, torch threads, GPU), the date, the steps trained and the minutes taken.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medalloy.engine.machine import cpu_model

ROOT = Path(__file__).resolve().parents[1]


def config_sha256(path: Path) -> str:
    """The arm's identity: its file's bytes (the variables, such as where the data lies on this
    machine, are recorded beside it, not hashed: the same config on two machines is one arm)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def code_version() -> dict[str, Any]:
    """The commit of this checkout and whether tracked files differ from it (None outside git)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "--short=12", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    import medalloy

    return {"commit": commit, "dirty": bool(status) if status is not None else None, "medalloy": medalloy.__version__}


def machine() -> dict[str, Any]:
    """The hardware a time or a budget was measured on."""
    info: dict[str, Any] = {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(), "gpu": None}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    info["python"] = platform.python_version()
    return info


def build(
    study: str, arm: str, config: Path, command: str, minutes: float, steps: dict[str, int] | None, variables: dict[str, str] | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "study": study,
        "arm": arm,
        "config": config.resolve().relative_to(ROOT).as_posix() if config.resolve().is_relative_to(ROOT) else str(config),
        "config_sha256": config_sha256(config),
        "variables": dict(sorted((variables or {}).items())),
        "command": command,
        **code_version(),
        "machine": machine(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "steps": steps,
        "minutes": round(minutes, 2),
        **extra,
    }


def write(path: Path, manifest: dict[str, Any]) -> None:
    from medalloy.jsonio import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(manifest, indent=1) + "\n")
