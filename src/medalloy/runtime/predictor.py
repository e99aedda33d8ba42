"""Prediction with an exported ONNX graph on numpy and ONNX Runtime alone (no torch, no MONAI): the
deployment path of ``pip install medalloy`` (docs: deployment).

:class:`OnnxPredictor` does what ``engine/inference.Predictor`` does for the PyTorch path, step for
step: the image into network space (the plan's slice axis, normalisation, resampling), the
sliding window over the graph, the activation, back onto the input grid, the label values.
:func:`predict_folder` segments a folder as ``medalloy predict MODEL.onnx`` does.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from medalloy.data.input_folder import find_input_cases, output_ending, written_geometry
from medalloy.data.io import ImageMeta, read_image, write_label
from medalloy.data.network_grid import network_shape
from medalloy.data.normalize import normalize
from medalloy.errors import MedalloyError
from medalloy.planning.input_fit import as_trained, geometry_of_files, rescale_note
from medalloy.planning.plan import Plan
from medalloy.runtime.resample import resize_linear
from medalloy.runtime.sidecar import INPUT, OUTPUT, onnx_session, read_sidecar, sidecar_path
from medalloy.runtime.sliding_window import sliding_window

SLICE_BATCH = 16  # 2D plans: slices of a volume a window batch takes, as the PyTorch predictor


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class OnnxPredictor:
    """An exported graph and its plan: ``predict_probabilities(image, meta)`` ``(C, *spatial)`` ->
    ``(K, *spatial)`` on the input grid, ``to_labels`` -> the label map in the plan's values."""

    def __init__(self, onnx_file: str | Path, threads: int | None = None, tta: bool = False, overlap: float = 0.5):
        self.meta = read_sidecar(onnx_file)
        try:
            self.plan = Plan.model_validate(self.meta["plan"])
        except Exception:
            raise MedalloyError("the sidecar's plan is not valid", sidecar_path(onnx_file), "export again with medalloy export") from None
        self.session = onnx_session(Path(onnx_file), threads)
        self.activation = self.meta.get("activation", "softmax")
        self.tta, self.overlap = tta, overlap

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT], {INPUT: x.astype(np.float32, copy=False)})[0]

    def _probs(self, x: np.ndarray) -> np.ndarray:
        """``x`` ``(N, C, *net)`` -> probabilities; with TTA, averaged over every mirroring of the spatial axes."""
        activate = _softmax if self.activation == "softmax" else _sigmoid
        window = lambda inp: activate(sliding_window(inp, self.plan.patch_size, self._run, self.overlap))  # noqa: E731
        probs = window(x)
        if not self.tta:
            return probs
        axes = list(range(2, x.ndim))
        flips = [f for r in range(1, len(axes) + 1) for f in itertools.combinations(axes, r)]
        for flip in flips:
            probs = probs + np.flip(window(np.ascontiguousarray(np.flip(x, flip))), flip)
        return probs / (len(flips) + 1)

    def predict_probabilities(self, image: np.ndarray, meta: ImageMeta, path: object = None) -> np.ndarray:
        plan = self.plan
        if plan.dim == 2:
            if meta.ndim == 3:
                if plan.slice_axis is None:
                    raise MedalloyError("2D plan without slice_axis applied to a 3D image", path, "set slice_axis in the plan")
                image = np.moveaxis(image, 1 + plan.slice_axis, 1)
            elif meta.ndim == 2:
                image = image[:, None]
            else:
                raise MedalloyError(f"cannot apply a 2D plan to a {meta.ndim}D image", path)
        elif meta.ndim != 3:
            raise MedalloyError(f"a 3D plan needs 3D images, got {meta.ndim}D", path, "use a 2D plan for 2D data")
        net = resize_linear(normalize(image, plan.normalization, path), network_shape(meta, plan))
        if plan.dim == 2:
            slices = np.moveaxis(net, 1, 0)  # (S, C, H, W): the slices as a batch
            probs = np.concatenate([self._probs(slices[i : i + SLICE_BATCH]) for i in range(0, len(slices), SLICE_BATCH)])
            orig = [s for a, s in enumerate(meta.shape) if not (meta.ndim == 3 and a == plan.slice_axis)]
            out = resize_linear(probs, tuple(orig))  # (S, K, *orig)
            return np.moveaxis(out, 0, 1 + plan.slice_axis) if meta.ndim == 3 else out[0]
        return resize_linear(self._probs(net[None])[0], tuple(meta.shape))

    def to_labels(self, probs: np.ndarray) -> np.ndarray:
        """As the PyTorch predictor: the most probable class; sigmoid outputs (one per task): the
        most probable task above 0.5, else background."""
        if self.activation == "sigmoid":
            probs = np.concatenate([np.full_like(probs[:1], 0.5), probs])
        return np.asarray(self.plan.label_values, dtype=np.int64)[probs.argmax(0)]


def predict_folder(
    onnx_file: str | Path,
    input_dir: str | Path,
    output_dir: str | Path,
    tta: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    native_size: bool = False,
    threads: int | None = None,
    say: Callable[[str], None] | None = None,
) -> list[Path]:
    """Label maps of every case of ``input_dir`` into ``output_dir`` (``CASE<ending>``, the input's
    geometry); PNG/JPEG inputs more than ``FIT_TOLERANCE`` off the training size are resampled to it
    unless ``native_size`` (``say`` gets that note). Returns the written files."""
    predictor = OnnxPredictor(onnx_file, threads=threads, tta=tta)
    plan = predictor.plan
    cases = find_input_cases(input_dir)
    out = Path(output_dir)
    existing = [c for c in cases if any(out.glob(f"{c}.*"))] if out.exists() else []
    if existing and not overwrite:
        raise MedalloyError(f"predictions exist already (e.g. {existing[0]})", out, "pass --overwrite or choose another --output")
    note = rescale_note(plan, geometry_of_files([cases[c] for c in sorted(cases)])) if not native_size and plan.median_shape else None
    rescale = note is not None
    if note and say:
        say(note)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for case, files in tqdm(list(cases.items()), desc="predict", unit="case", disable=not progress):
        image, meta = read_image(files)
        probs = predictor.predict_probabilities(image, as_trained(meta, plan) if rescale else meta, files[0])
        target = out / f"{case}{output_ending(files[0], meta.ndim)}"
        write_label(target, predictor.to_labels(probs), written_geometry(meta))
        written.append(target)
    return written


def describe(onnx_file: str | Path) -> dict[str, Any]:
    """The sidecar of an exported graph (what it predicts, from what)."""
    return read_sidecar(onnx_file)
