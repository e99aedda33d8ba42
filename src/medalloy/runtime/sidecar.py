"""An exported graph's sidecar (``MODEL.onnx.json``: the plan, labels, activation, tasks and the
graph's sha256, so a sidecar of another model is refused) and its ONNX Runtime session."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from medalloy.errors import MedalloyError
from medalloy.jsonio import read_json

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


def onnx_session(path: Path, threads: int | None):
    try:
        import onnxruntime as ort
    except ImportError:
        raise MedalloyError("onnxruntime is not installed", path, "pip install onnxruntime (part of the base install: pip install medalloy)") from None
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
        raise MedalloyError(f"not a readable ONNX graph ({str(exc).splitlines()[0][:120]})", path, "export it again with medalloy export") from None


def read_sidecar(onnx_file: str | Path) -> dict[str, Any]:
    """The sidecar of ``onnx_file``, checked to describe that very graph."""
    onnx_file = Path(onnx_file)
    side = sidecar_path(onnx_file)
    if not onnx_file.is_file():
        raise MedalloyError("ONNX file not found", onnx_file, "give the path medalloy export wrote")
    if not side.is_file():
        raise MedalloyError(
            f"no sidecar {side.name} beside the graph (it holds the plan and labels prediction needs)",
            onnx_file,
            "export with medalloy export, which writes both",
        )
    meta = read_json(side, "sidecar", "export again with medalloy export")
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise MedalloyError("not a medalloy ONNX sidecar", side, "export again with medalloy export")
    if meta.get("onnx_sha256") != file_sha256(onnx_file):
        raise MedalloyError(
            "the sidecar describes another model (sha256 differs from the graph's)", side, "keep each .onnx with the .onnx.json exported with it"
        )
    return meta
