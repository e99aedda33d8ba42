"""Per-call latency of a model: the median wall-clock time of many calls after a warm-up (a
benchmark measure, never a test assertion). Runtimes: PyTorch eager in fp32 or bf16 autocast, and
an ONNX Runtime session through :class:`~medalloy.interop.onnx_runtime.OnnxModule`."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], runs: int = 50, warmup: int = 5) -> float:
    """Median milliseconds of ``fn()`` over ``runs`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def model_latency_ms(model: torch.nn.Module, shape: tuple[int, ...] | list[int], precision: str = "fp32", runs: int = 50, warmup: int = 5) -> float:
    """Median ms of one forward pass of a batch-1 input ``(C, *spatial)``, inference mode, on the CPU."""
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    model = model.eval()

    def call() -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            model(x)

    return median_ms(call, runs, warmup)
