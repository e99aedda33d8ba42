"""Run an exported ONNX graph with the same pre- and post-processing as the PyTorch path.

``medalloy export`` writes ``MODEL.onnx`` and its sidecar ``MODEL.onnx.json``: what prediction
needs besides the graph (the plan: spacing, normalisation, patch; label values and names; the
activation; the tasks of a universal model) and the graph's sha256, so that a sidecar of another
model is refused. :class:`OnnxModule` wraps an ONNX Runtime session as a module
``(B, C, *patch) -> (B, K, *patch)``, so the shared ``Predictor`` (sliding window, TTA) runs it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medalloy.errors import MedalloyError
from medalloy.jsonio import read_json
from medalloy.planning.plan import Plan

SIDECAR_FORMAT = "medalloy.onnx"
SIDECAR_VERSION = 1
INPUT, OUTPUT = "image", "logits"


def sidecar_path(onnx_file: str | Path) -> Path:
    onnx_file = Path(onnx_file)
    return onnx_file.with_name(onnx_file.name + ".json")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _session(path: Path, threads: int | None):
    try:
        import onnxruntime as ort
    except ImportError:
        raise MedalloyError("onnxruntime is not installed", path, 'pip install "medalloy[onnx]" (after torch)') from None
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
        raise MedalloyError(f"not a readable ONNX graph ({str(exc).splitlines()[0][:120]})", path, "export it again with medalloy export") from None


class OnnxModule(nn.Module):
    """An ONNX Runtime session as a module: float32 in, float32 logits out (CPU)."""

    def __init__(self, session: Any):
        super().__init__()
        self.session = session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run([OUTPUT], {INPUT: x.detach().to("cpu", torch.float32).contiguous().numpy()})[0]
        return torch.from_numpy(np.ascontiguousarray(out)).to(x.device)


def read_sidecar(onnx_file: str | Path) -> dict[str, Any]:
    """The sidecar of ``onnx_file``, checked to describe that very graph."""
    onnx_file = Path(onnx_file)
    side = sidecar_path(onnx_file)
    if not onnx_file.is_file():
        raise MedalloyError("ONNX file not found", onnx_file, "give the path medalloy export wrote")
    if not side.is_file():
        raise MedalloyError(f"no sidecar {side.name} beside the graph (it holds the plan and labels prediction needs)", onnx_file, "export with medalloy export, which writes both")
    meta = read_json(side, "sidecar", "export again with medalloy export")
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise MedalloyError("not a medalloy ONNX sidecar", side, "export again with medalloy export")
    if meta.get("onnx_sha256") != file_sha256(onnx_file):
        raise MedalloyError("the sidecar describes another model (sha256 differs from the graph's)", side, "keep each .onnx with the .onnx.json exported with it")
    return meta


def load_onnx(onnx_file: str | Path, threads: int | None = None) -> tuple[OnnxModule, Plan, dict[str, Any]]:
    """Module, plan and record-like metadata (``activation``, ``method``, ``tasks``) of an exported graph."""
    meta = read_sidecar(onnx_file)
    try:
        plan = Plan.model_validate(meta["plan"])
    except Exception:
        raise MedalloyError("the sidecar's plan is not valid", sidecar_path(onnx_file), "export again with medalloy export") from None
    return OnnxModule(_session(Path(onnx_file), threads)), plan, meta
