"""Run an exported ONNX graph with the same pre- and post-processing as the PyTorch path.

``medalloy export`` writes ``MODEL.onnx`` and its sidecar ``MODEL.onnx.json``: what prediction
needs besides the graph (the plan: spacing, normalisation, patch; label values and names; the
activation; the tasks of a universal model) and the graph's sha256, so that a sidecar of another
model is refused. :class:`OnnxModule` wraps an ONNX Runtime session as a module
``(B, C, *patch) -> (B, K, *patch)``, so the shared ``Predictor`` (sliding window, TTA) runs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medalloy.errors import MedalloyError
from medalloy.planning.plan import Plan
from medalloy.runtime.sidecar import INPUT, OUTPUT, SIDECAR_FORMAT, SIDECAR_VERSION, file_sha256, onnx_session, read_sidecar, sidecar_path

__all__ = ["INPUT", "OUTPUT", "SIDECAR_FORMAT", "SIDECAR_VERSION", "OnnxModule", "file_sha256", "load_onnx", "read_sidecar", "sidecar_path"]


class OnnxModule(nn.Module):
    """An ONNX Runtime session as a module: float32 in, float32 logits out (CPU)."""

    def __init__(self, session: Any):
        super().__init__()
        self.session = session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run([OUTPUT], {INPUT: x.detach().to("cpu", torch.float32).contiguous().numpy()})[0]
        return torch.from_numpy(np.ascontiguousarray(out)).to(x.device)


def load_onnx(onnx_file: str | Path, threads: int | None = None) -> tuple[OnnxModule, Plan, dict[str, Any]]:
    """Module, plan and record-like metadata (``activation``, ``method``, ``tasks``) of an exported graph."""
    meta = read_sidecar(onnx_file)
    try:
        plan = Plan.model_validate(meta["plan"])
    except Exception:
        raise MedalloyError("the sidecar's plan is not valid", sidecar_path(onnx_file), "export again with medalloy export") from None
    return OnnxModule(onnx_session(Path(onnx_file), threads)), plan, meta
