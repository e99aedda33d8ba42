"""``medalloy predict RUN|MODEL.onnx|NNUNET_FOLDER --input DIR --output DIR``: label maps in the input's format and geometry.

``NNUNET_FOLDER``: a trained nnU-Net v2 model (``TRAINER__PLANS__CONFIG`` or its ``fold_X``; see
:mod:`medalloy.interop.nnunet`), ``--checkpoint best`` its ``checkpoint_best.pth`` (else
``checkpoint_final.pth``), ``last`` its ``checkpoint_final.pth``.

Input cases follow nnU-Net's naming (``CASE_0000.ext`` [+ ``CASE_0001.ext`` ...]); a folder of plain
images (no channel suffix) is read one case per file. Outputs are ``CASE.ext`` (DICOM inputs become
``.nii.gz`` for volumes, ``.png`` for 2D), and with ``--probabilities`` also ``CASE.npz`` holding
``probabilities`` ``(K, *spatial)`` float16, as nnU-Net writes them.

Models load through :func:`medalloy.recipes.registry.load_model` (re-exported here). The three
public functions share one loop (:func:`_predict_each`: read a case, predict its probabilities,
hand them to each writer): :class:`LabelWriter` (label maps), :class:`TaskMaskWriter` (one binary
mask per task) and :class:`ProbabilityWriter` (``.npz``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from medalloy.data.input_folder import find_input_cases, output_ending, written_geometry
from medalloy.data.io import ImageMeta, read_image, write_label
from medalloy.engine.inference import Predictor
from medalloy.errors import MedalloyError
from medalloy.jsonio import atomic_path
from medalloy.planning.input_fit import InputGeometry, as_trained, geometry_of_files, misfit, rescale_note
from medalloy.planning.plan import Plan
from medalloy.recipes.registry import load_model, load_task_model, resolve_source


# -- one case, one loop, its writers ------------------------------------------------------------------
@dataclass(frozen=True)
class CaseImage:
    """One case read for prediction: ``image`` ``(C, *spatial)`` float32 and its ``meta``; ``source``
    (its first file, which errors name); outputs are ``CASE<ending>`` with ``geometry`` (None:
    written without one, as for 2D DICOM inputs, which become plain PNGs)."""

    case_id: str
    image: np.ndarray
    meta: ImageMeta
    source: Path
    ending: str
    geometry: ImageMeta | None


class LabelWriter:
    """``out/CASE<ending>``: the label map (dataset label values) in the input's geometry;
    ``keep`` (label values): the others become background."""

    def __init__(self, out: Path, keep: list[int] | None = None):
        self.out, self.keep, self.written = out, keep, []

    def __call__(self, case: CaseImage, probs: torch.Tensor, predictor: Predictor) -> None:
        label = predictor.to_labels(probs)
        if self.keep is not None:
            label = np.where(np.isin(label, self.keep), label, 0)
        target = self.out / f"{case.case_id}{case.ending}"
        write_label(target, label, case.geometry)
        self.written.append(target)


class TaskMaskWriter:
    """``out/<task>/CASE<ending>``: per task (channel ``k`` of ``tasks``) 1 where its probability
    exceeds 0.5, else 0 (tasks may overlap, unlike in a label map)."""

    def __init__(self, out: Path, tasks: list[str]):
        self.out, self.tasks, self.written = out, tasks, []

    def __call__(self, case: CaseImage, probs: torch.Tensor, predictor: Predictor) -> None:
        for k, task in enumerate(self.tasks):
            target = self.out / task / f"{case.case_id}{case.ending}"
            target.parent.mkdir(parents=True, exist_ok=True)
            write_label(target, (probs[k] > 0.5).numpy().astype(np.uint8), case.geometry)
            self.written.append(target)


class ProbabilityWriter:
    """``out/CASE.npz`` holding ``probabilities`` ``(K, *spatial)`` float16, as nnU-Net writes them."""

    def __init__(self, out: Path):
        self.out, self.written = out, []

    def __call__(self, case: CaseImage, probs: torch.Tensor, predictor: Predictor) -> None:
        target = self.out / f"{case.case_id}.npz"
        with atomic_path(target) as tmp:  # the temporary name ends in .npz, so numpy adds no second one
            np.savez_compressed(tmp, probabilities=probs.numpy().astype(np.float16))
        self.written.append(target)


Writer = Callable[[CaseImage, torch.Tensor, Predictor], None]
T = TypeVar("T")


def _predict_each(predictor: Predictor, items: Sequence[T], read: Callable[[T], CaseImage], writers: Iterable[Writer], progress: bool) -> None:
    """For each item: read its case, predict probabilities ``(K, *spatial)`` on its grid, write them with every writer in turn."""
    writers = list(writers)
    for item in tqdm(items, desc="predict", unit="case", disable=not progress):
        case = read(item)
        probs = predictor.predict_probabilities(case.image, case.meta, case.source)
        for write in writers:
            write(case, probs, predictor)


def _folder_case(item: tuple[str, list[Path]], rescale_to: Plan | None = None) -> CaseImage:
    """The case read from its files; ``rescale_to``: predicted at that plan's typical size (:func:`as_trained`)."""
    case, files = item
    image, meta = read_image(files)
    seen = as_trained(meta, rescale_to) if rescale_to is not None else meta
    return CaseImage(case, image, seen, files[0], output_ending(files[0], meta.ndim), written_geometry(meta))


def input_geometry(cases: dict[str, list[Path]]) -> InputGeometry:
    """The median geometry of an input folder's cases, from their headers."""
    files = [cases[c] for c in sorted(cases)]
    try:
        return geometry_of_files(files)
    except ValueError as exc:
        raise MedalloyError(f"input images differ in kind ({exc})", files[0][0].parent, "predict 2D and 3D images from separate folders") from None


def _scale_choice(plan: Plan, cases: dict[str, list[Path]], native_size: bool) -> tuple[Plan | None, str | None]:
    """The plan to bring natural images to (None: as they are) and a one-line note when they are
    resampled: their median size is more than FIT_TOLERANCE off the training data's."""
    if native_size or not cases or not plan.median_shape:
        return None, None
    note = rescale_note(plan, input_geometry(cases))
    return (plan, note) if note else (None, None)


def _predictor(model, plan, record: dict[str, Any], device: str, precision: str, tta: bool) -> Predictor:
    return Predictor(model, plan, device=device, precision=precision, tta=tta, activation=record.get("activation", "softmax"))


def _device(device: str) -> str:
    from medalloy.engine.distributed import resolve_device

    return str(resolve_device(device))


def _kept_values(labels: dict[str, int], keep: list[str] | None, source: Path) -> list[int] | None:
    """Label values of the names in ``keep`` (None: keep all); unknown names are an error."""
    if keep is None:
        return None
    unknown = [k for k in keep if k not in labels]
    if unknown:
        raise MedalloyError(f"the model has no label {unknown[0]!r} (it has {', '.join(labels)})", source, "name labels the model predicts")
    return [labels[k] for k in keep]


def predict_cases(
    run: str | Path,
    dataset: str | Path,
    case_ids: list[str],
    output_dir: str | Path,
    keep_labels: list[str] | None = None,
    tta: bool = False,
    checkpoint: str = "best",
    device: str = "auto",
    precision: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    as_dataset: str | None = None,
    native_size: bool = False,
) -> list[Path]:
    """Predict cases of a raw dataset by id (e.g. a held-out fold) into ``output_dir`` as
    ``CASE<file_ending>``; ``keep_labels`` names the labels to keep (others become background,
    e.g. to score a lung+heart model on a lung-only dataset). ``as_dataset`` (universal models):
    the training dataset whose tasks and preprocessing apply (default: this dataset's name, e.g.
    another name to test a source the model was asked about as if it came from that one).
    A dataset of natural images whose median size is more than ``FIT_TOLERANCE`` off the model's
    training data is predicted at that data's typical size, as :func:`predict_folder` does, unless
    ``native_size``. Returns the written files."""
    from medalloy.data.dataset import Case, RawDataset
    from medalloy.planning.input_fit import dataset_geometry

    dev = _device(device)
    source = resolve_source(run, checkpoint)
    ds = RawDataset(dataset)
    model, plan, record = load_model(source.path, dev, dataset=as_dataset or ds.name)
    kept = _kept_values(plan.labels, keep_labels, source.path)
    cases = [ds.case(cid) for cid in case_ids]  # unknown ids fail before any work
    out = Path(output_dir)
    existing = [t for t in (out / f"{c.case_id}{ds.spec.file_ending}" for c in cases) if t.exists()]
    if existing and not overwrite:
        raise MedalloyError("prediction exists already", existing[0], "pass overwrite=True or choose another output folder")
    out.mkdir(parents=True, exist_ok=True)
    rescale = not native_size and bool(plan.median_shape) and misfit(plan, dataset_geometry(ds)) is not None

    def read(case: Case) -> CaseImage:
        image, _, meta = ds.load(case)  # the label too, if any: one whose grid differs is an error here as in training
        return CaseImage(case.case_id, image, as_trained(meta, plan) if rescale else meta, case.images[0], ds.spec.file_ending, meta)

    labels = LabelWriter(out, kept)
    _predict_each(_predictor(model, plan, record, dev, precision, tta), cases, read, [labels], progress)
    return labels.written


def predict_folder(
    run: str | Path,
    input_dir: str | Path,
    output_dir: str | Path,
    tta: bool = False,
    probabilities: bool = False,
    checkpoint: str = "best",
    device: str = "auto",
    precision: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    dataset: str | None = None,
    native_size: bool = False,
    say: Callable[[str], None] | None = None,
) -> list[Path]:
    """Predict every case of ``input_dir`` into ``output_dir``; returns the written label files.
    ``dataset``: for a model of several datasets, the one whose tasks and preprocessing apply.
    Natural images (PNG, JPEG: no spacing) whose median size is more than ``FIT_TOLERANCE`` off
    the training data's are resampled to its typical size unless ``native_size``; ``say`` gets
    that note."""
    dev = _device(device)
    model, plan, record = load_model(run, dev, dataset=dataset, which=checkpoint)
    cases = find_input_cases(input_dir)
    rescale_to, note = _scale_choice(plan, cases, native_size)
    if note and say:
        say(note)
    out = Path(output_dir)
    existing = [c for c in cases if any(out.glob(f"{c}.*"))] if out.exists() else []
    if existing and not overwrite:
        raise MedalloyError(f"predictions exist already (e.g. {existing[0]})", out, "pass --overwrite or choose another --output")
    out.mkdir(parents=True, exist_ok=True)
    labels = LabelWriter(out)
    writers: list[Writer] = [labels, ProbabilityWriter(out)] if probabilities else [labels]
    _predict_each(_predictor(model, plan, record, dev, precision, tta), list(cases.items()), lambda c: _folder_case(c, rescale_to), writers, progress)
    return labels.written


def predict_tasks(
    run: str | Path,
    input_dir: str | Path,
    output_dir: str | Path,
    tasks: list[str],
    dataset: str | None = None,
    modality: str | None = None,
    tta: bool = False,
    checkpoint: str = "best",
    device: str = "auto",
    precision: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    native_size: bool = False,
) -> tuple[list[Path], str]:
    """One binary mask per task and case, ``output_dir/<task>/CASE.ext`` (1 where that task's own
    sigmoid exceeds 0.5: tasks may overlap, unlike in a label map), for models with one output per
    task (universal). The preprocessing is ``dataset``'s, else that of the training dataset that
    annotates the first task (of ``modality``, when given) whose typical image is closest to the
    inputs' (:mod:`medalloy.planning.input_fit`); natural images far from every such dataset's
    size are resampled to the closest one's unless ``native_size``. Returns the files and a
    one-line note saying which preprocessing was used and why."""
    if not tasks:
        raise MedalloyError("no task given", fix="name at least one task with --task")
    dev = _device(device)
    cases = find_input_cases(input_dir)
    geometry = input_geometry(cases) if dataset is None and cases else None
    model, plan, _, note = load_task_model(run, tasks, dataset=dataset, modality=modality, device=dev, which=checkpoint, geometry=geometry)
    rescale_to, scale_note = _scale_choice(plan, cases, native_size)
    if scale_note:
        note = f"{note}; {scale_note}"
    out = Path(output_dir)
    existing = [out / t for t in tasks if (out / t).exists() and any((out / t).iterdir())]
    if existing and not overwrite:
        raise MedalloyError("task masks exist already", existing[0], "pass --overwrite or choose another --output")
    masks = TaskMaskWriter(out, tasks)
    predictor = Predictor(model, plan, device=dev, precision=precision, tta=tta, activation="sigmoid")
    _predict_each(predictor, list(cases.items()), lambda c: _folder_case(c, rescale_to), [masks], progress)
    return masks.written, note


def describe(record: dict[str, Any]) -> str:
    tasks = ", ".join(t["dataset"] for t in record.get("tasks", []))
    return f"{record.get('method')} model for {tasks} (step {record.get('step')})"
