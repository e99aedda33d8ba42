"""``medalloy export RUN --format onnx --out FILE.onnx``: a trained model (a run, a checkpoint, or an nnU-Net v2 model
folder: whatever ``medalloy predict`` loads, bar an ONNX graph) as an ONNX graph (opset >= 17,
dynamic batch; dynamic spatial size, any multiple of the network's total stride per axis, where the
network exports so (else the plan's patch, which is what the sliding window feeds it; the sidecar's
``spatial`` says which, and ``spatial.static_reason`` why, also logged as a warning) and its JSON sidecar (``interop/onnx_runtime.py``). A universal model is exported bound to one
dataset (``dataset``: its tasks, modality, preprocessing) or to a task list (``tasks``).

``quantize="int8"`` writes the int8 graph instead (``interop/quantize.py``): static quantization
with activation ranges from ``calibration`` (a folder of images, read and preprocessed as
``medalloy predict`` would, cut into the plan's patch), else dynamic (weights only).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from medalloy import __version__
from medalloy.errors import MedalloyError
from medalloy.interop.onnx_runtime import INPUT, OUTPUT, SIDECAR_FORMAT, SIDECAR_VERSION, file_sha256, sidecar_path
from medalloy.jsonio import atomic_path, write_json_atomic
from medalloy.recipes.registry import ONNX, load_model, load_task_model, resolve_source

MIN_OPSET = 17

log = logging.getLogger(__name__)


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
    if tasks:
        model, plan, record, _ = load_task_model(ckpt, tasks, dataset=dataset, modality=modality, device="cpu")
        return model, plan, {**record, "activation": "sigmoid"}
    return load_model(ckpt, "cpu", dataset=dataset)


def calibration_patches(plan, folder: str | Path, count: int = 32, seed: int = 0) -> list[np.ndarray]:
    """Up to ``count`` network inputs ``(1, C, *patch)`` from the images of ``folder``, preprocessed
    with ``plan`` (random patches of the padded image; 2D plans take one slice of a volume)."""
    from medalloy.data.io import read_image
    from medalloy.data.preprocess import pad_to_patch, to_network_space
    from medalloy.predict import find_input_cases

    cases = find_input_cases(folder)
    rng = np.random.default_rng(seed)
    ids = sorted(cases)
    rng.shuffle(ids)
    out = []
    for i in range(count):
        files = cases[ids[i % len(ids)]]
        image, meta = read_image(files)
        if image.shape[0] != plan.in_channels and image.shape[0] != 1:
            raise MedalloyError(
                f"calibration image has {image.shape[0]} channels, the model {plan.in_channels}", files[0], "calibrate with images of the training modality"
            )
        net, _ = to_network_space(image, None, meta, plan, files[0])
        if net.shape[0] != plan.in_channels:
            net = np.repeat(net, plan.in_channels, 0)  # one-channel images in a model of several (as in training)
        if plan.dim == 2:
            net = net[:, rng.integers(net.shape[1])]
        net, _, _ = pad_to_patch(net, None, plan.patch_size)
        corner = [int(rng.integers(0, s - p + 1)) for s, p in zip(net.shape[1:], plan.patch_size)]
        window = tuple(slice(c, c + p) for c, p in zip(corner, plan.patch_size))
        out.append(np.ascontiguousarray(net[(slice(None), *window)][None], np.float32))
    return out


def export_onnx(
    run: str | Path,
    out: str | Path,
    dataset: str | None = None,
    tasks: list[str] | None = None,
    modality: str | None = None,
    checkpoint: str = "best",
    opset: int = 18,
    overwrite: bool = False,
    quantize: Literal["int8"] | None = None,
    calibration: str | Path | None = None,
    calibration_samples: int = 32,
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
    if quantize not in (None, "int8"):
        raise MedalloyError(f"unknown quantization '{quantize}'", fix="use --quantize int8")
    source = resolve_source(run, checkpoint)
    if source.kind == ONNX:
        raise MedalloyError("this is an exported ONNX graph already", source.path, "export the run or checkpoint it was exported from")
    ckpt = source.path
    model, plan, record = _model(ckpt, dataset, tasks, modality)
    patches = calibration_patches(plan, calibration, calibration_samples) if quantize and calibration is not None else None
    model = model.eval().float()
    # batch 2: torch.export specialises axes of size 1, the batch axis must stay dynamic
    example = torch.zeros(2, plan.in_channels, *plan.patch_size)
    with torch.no_grad():
        reference = model(example)
    multiple = plan.network.total_stride()
    with atomic_path(out) as tmp:
        program, spatial = _export(model, example, opset, multiple)
        if quantize:
            from medalloy.interop.quantize import quantize_int8

            fp32 = tmp.with_name(tmp.name + ".fp32.onnx")  # a .tmp- name too: a killed run's leftover is swept
            try:
                program.save(str(fp32))
                quantize_int8(fp32, tmp, "static" if patches else "dynamic", patches)
            finally:
                fp32.unlink(missing_ok=True)
        else:
            program.save(str(tmp))
        sha = file_sha256(tmp)
    sizes = (["height", "width"] if plan.dim == 2 else ["depth", "height", "width"]) if spatial["dynamic"] else list(plan.patch_size)
    meta = {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "medalloy": __version__,  # the release that exported it (the sidecar's own format is "version")
        "onnx_file": out.name,
        "onnx_sha256": sha,
        "opset": opset,
        "quantization": None
        if not quantize
        else {"type": "int8", "mode": "static" if patches else "dynamic", "calibration": str(calibration) if patches else None, "samples": len(patches or [])},
        "method": record.get("method"),
        "name": record.get("name"),
        "exported_from": str(ckpt),
        "activation": record.get("activation", "softmax"),
        "tasks": list(tasks) if tasks else None,
        "dataset": dataset,
        "labels": plan.labels,
        "plan": plan.model_dump(mode="json"),
        "spatial": spatial,
        "input": {"name": INPUT, "shape": ["batch", plan.in_channels, *sizes], "dtype": "float32"},
        "output": {"name": OUTPUT, "shape": ["batch", int(reference.shape[1]), *sizes]},
    }
    write_json_atomic(side, meta)
    return meta


def _export(model: torch.nn.Module, example: torch.Tensor, opset: int, multiple: list[int]):
    """The exported program and the sidecar's ``spatial`` entry: dynamic spatial axes (each
    ``multiple * k``) where torch.export keeps them symbolic, else the example's fixed size."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    spatial_axes = {
        2 + i: m * torch.export.Dim(f"k{i}", min=1, max=max(2, 8 * int(example.shape[2 + i]) // m)) for i, m in enumerate(multiple)
    }  # fmt: skip

    def run(shapes: dict):
        # the exporter reports its progress on stdout and its optimiser's notes as warnings; medalloy says one line instead
        with contextlib.redirect_stdout(io.StringIO()), _quiet("onnxscript", "torch.onnx", "torch.export"), torch.no_grad():
            return torch.onnx.export(model, (example,), input_names=[INPUT], output_names=[OUTPUT], opset_version=opset, dynamo=True, dynamic_shapes=(shapes,))

    try:
        return run({0: batch, **spatial_axes}), {"dynamic": True, "multiple_of": multiple}
    except torch.onnx.errors.OnnxExporterError as error:  # the base of the exporter's capture and conversion errors
        # a network whose graph fixes its sizes: keep the plan's patch, and say why rather than hide it
        reason = _one_line(error)
        log.warning("ONNX export: dynamic spatial axes failed, exporting the plan's fixed patch instead (%s)", reason)
        return run({0: batch}), {"dynamic": False, "multiple_of": multiple, "static_reason": reason}


def _one_line(error: Exception) -> str:
    """The error's type and the exporter's own summary of its cause (the first line of its message
    is generic advice), colour codes stripped."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if line.strip()]
    cause = next((lines[i + 1] for i, line in enumerate(lines[:-1]) if line == "## Exception summary"), None)
    return f"{type(error).__name__}: {cause or (lines[0] if lines else '')}"
