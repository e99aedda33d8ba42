"""``medalloy export RUN --format onnx --out FILE.onnx``: a trained model as an ONNX graph (opset >= 17,
dynamic batch; the spatial size is the plan's patch, which is what the sliding window feeds it)
and its JSON sidecar (``interop/onnx_runtime.py``). A universal model is exported bound to one
dataset (``dataset``: its tasks, modality, preprocessing) or to a task list (``tasks``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path
from typing import Any

import torch

from medalloy.errors import MedalloyError
from medalloy.interop.onnx_runtime import INPUT, OUTPUT, SIDECAR_FORMAT, SIDECAR_VERSION, file_sha256, sidecar_path
from medalloy.jsonio import write_json_atomic
from medalloy.runs import resolve_checkpoint

MIN_OPSET = 17


@contextlib.contextmanager
def _quiet(*loggers: str):
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _model(ckpt: Path, dataset: str | None, tasks: list[str] | None, modality: str | None):
    from medalloy.recipes.registry import load_checkpoint_model, load_checkpoint_tasks

    if tasks:
        model, plan, record, _ = load_checkpoint_tasks(ckpt, tasks, dataset=dataset, modality=modality, device="cpu")
        return model, plan, {**record, "activation": "sigmoid"}
    return load_checkpoint_model(ckpt, "cpu", dataset=dataset)


def export_onnx(
    run: str | Path,
    out: str | Path,
    dataset: str | None = None,
    tasks: list[str] | None = None,
    modality: str | None = None,
    checkpoint: str = "best",
    opset: int = 18,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``out`` (``.onnx``) and ``out.json``; returns the sidecar."""
    out = Path(out)
    if out.suffix != ".onnx":
        raise MedalloyError("the output must end in .onnx", out, "pass --out MODEL.onnx")
    if opset < MIN_OPSET:
        raise MedalloyError(f"opset {opset} is below {MIN_OPSET}", fix=f"use --opset {MIN_OPSET} or higher")
    side = sidecar_path(out)
    if (out.exists() or side.exists()) and not overwrite:
        raise MedalloyError("the ONNX file exists already", out, "pass --overwrite or choose another --out")
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError:
        raise MedalloyError("ONNX export needs the onnx extra", fix='pip install "medalloy[onnx]" (after torch)') from None
    ckpt = resolve_checkpoint(run, checkpoint)
    model, plan, record = _model(ckpt, dataset, tasks, modality)
    model = model.eval().float()
    # batch 2: torch.export specialises axes of size 1, the batch axis must stay dynamic
    example = torch.zeros(2, plan.in_channels, *plan.patch_size)
    with torch.no_grad():
        reference = model(example)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{os.getpid()}-{out.name}")
    batch = torch.export.Dim("batch", min=1, max=1024)
    try:
        # the exporter reports its progress on stdout and its optimiser's notes as warnings; medalloy says one line instead
        with contextlib.redirect_stdout(io.StringIO()), _quiet("onnxscript", "torch.onnx", "torch.export"), torch.no_grad():
            program = torch.onnx.export(
                model, (example,), input_names=[INPUT], output_names=[OUTPUT], opset_version=opset, dynamo=True, dynamic_shapes=({0: batch},)
            )
        program.save(str(tmp))
        sha = file_sha256(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    meta = {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "onnx_file": out.name,
        "onnx_sha256": sha,
        "opset": opset,
        "method": record.get("method"),
        "name": record.get("name"),
        "exported_from": str(ckpt),
        "activation": record.get("activation", "softmax"),
        "tasks": list(tasks) if tasks else None,
        "dataset": dataset,
        "labels": plan.labels,
        "plan": plan.model_dump(mode="json"),
        "input": {"name": INPUT, "shape": ["batch", plan.in_channels, *plan.patch_size], "dtype": "float32"},
        "output": {"name": OUTPUT, "shape": ["batch", int(reference.shape[1]), *plan.patch_size]},
    }
    write_json_atomic(side, meta)
    return meta
