"""Checkpoints: safetensors weights with a JSON header (method, tasks, plan, versions); no pickle.

A checkpoint is one ``.safetensors`` file whose metadata key ``"medalloy"`` holds the JSON record;
a readable copy of that record is written beside it as ``.json``. Tensors are keyed
``"<group>/<name>"`` (``model/...``, ``ema/...``, ``optim/...``) so one file can hold several modules.
Writes go to a temporary file renamed into place, so a killed run never leaves a torn checkpoint.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from medalloy.errors import MedalloyError
from medalloy.jsonio import atomic_path, write_json_atomic

FORMAT = "medalloy-checkpoint"
FORMAT_VERSION = 1
META_KEY = "medalloy"


def versions() -> dict[str, str]:
    import monai

    import medalloy

    return {
        "medalloy": medalloy.__version__,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
    }


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> Path:
    """Atomically write ``tensors`` and ``record`` (JSON-serialisable) to ``path`` (``.safetensors``)."""
    from safetensors.torch import save_file

    path = Path(path)
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, "versions": versions(), **record}
    text = json.dumps(full)
    # safetensors refuses shared or non-contiguous storage; clone keeps the caller's tensors untouched.
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(flat, str(tmp), metadata={META_KEY: text})
    write_json_atomic(path.with_suffix(".json"), full)
    return path


def read_record(path: str | Path) -> dict[str, Any]:
    """The JSON record of a checkpoint, without loading its tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise MedalloyError("checkpoint not found", path, "check the run folder (checkpoints/best.safetensors or last.safetensors)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:
        raise MedalloyError(
            f"not a readable safetensors checkpoint ({exc.__class__.__name__})", path, "the file is corrupt or of another format: retrain or restore it"
        ) from None
    if META_KEY not in meta:
        raise MedalloyError("safetensors file has no medalloy record", path, "load only checkpoints written by medalloy")
    try:
        record = json.loads(meta[META_KEY])
    except json.JSONDecodeError:
        raise MedalloyError("checkpoint record is not valid JSON", path, "the file is corrupt: retrain or restore it") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise MedalloyError("not a medalloy checkpoint", path, "load only checkpoints written by medalloy")
    if int(record.get("format_version", 0)) > FORMAT_VERSION:
        raise MedalloyError(f"checkpoint format {record.get('format_version')} is newer than this medalloy reads ({FORMAT_VERSION})", path, "upgrade medalloy")
    return record


def load_checkpoint(path: str | Path, method: str | None = None, map_location: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and record of a checkpoint; ``method`` (if given) must match the record's ``method``."""
    from safetensors.torch import load_file

    path = Path(path)
    record = read_record(path)
    if method is not None and record.get("method") != method:
        raise MedalloyError(f"checkpoint is for method '{record.get('method')}', not '{method}'", path, f"use a checkpoint trained with the '{method}' recipe")
    try:
        tensors = load_file(str(path), device=map_location)
    except Exception as exc:
        raise MedalloyError(f"checkpoint tensors unreadable ({exc.__class__.__name__})", path, "the file is corrupt: retrain or restore it") from None
    return tensors, record


def group(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors stored under ``prefix/`` with that prefix removed (e.g. a module's state dict)."""
    p = prefix.rstrip("/") + "/"
    return {k[len(p) :]: v for k, v in tensors.items() if k.startswith(p)}


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}/{k}": v for k, v in state.items()}


def _first_reason(exc: RuntimeError) -> str:
    """The informative line of a ``load_state_dict`` error (its first line only names the class)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = lines[1] if len(lines) > 1 else (lines[0] if lines else exc.__class__.__name__)
    return detail.rstrip(".")


def load_module_state(module: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path, name: str, fix: str) -> None:
    """``module.load_state_dict(state)`` (strict); weights of another shape or other keys raise one
    line naming the checkpoint and the module."""
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise MedalloyError(f"weights of module '{name}' do not fit ({_first_reason(exc)})", path, fix) from None
