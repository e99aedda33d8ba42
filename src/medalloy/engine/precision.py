"""Mixed precision: which autocast dtype to use on this device, and the context that applies it."""

from __future__ import annotations

import contextlib
from functools import cache
from pathlib import Path

import torch

from medalloy.errors import MedalloyError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@cache
def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX), where autocast pays off."""
    try:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            flags = Path("/proc/cpuinfo").read_text(encoding="utf-8") if Path("/proc/cpuinfo").exists() else ""
            # oneDNN reports "supported" on plain AVX512 too, where bf16 is emulated and slower.
            return not flags or ("avx512_bf16" in flags or "amx_bf16" in flags)
    except (AttributeError, RuntimeError):
        pass
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """Map ``auto`` to the fastest correct choice: bf16 on CPUs with bf16 units and bf16-capable GPUs,
    fp16 on older GPUs, fp32 otherwise."""
    if precision not in PRECISIONS:
        raise MedalloyError(f"unknown precision '{precision}'", fix=f"use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise MedalloyError("fp16 autocast is not supported on CPU", fix="use bf16 or fp32")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_supports_bf16():
        return "bf16"
    return "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
