"""``medalloy predict RUN|MODEL.onnx|NNUNET_FOLDER --input DIR --output DIR``: label maps in the input's format and geometry.

``NNUNET_FOLDER``: a trained nnU-Net v2 model (``TRAINER__PLANS__CONFIG`` or its ``fold_X``; see
:mod:`medalloy.interop.nnunet`), ``--checkpoint best`` its ``checkpoint_best.pth`` (else
``checkpoint_final.pth``), ``last`` its ``checkpoint_final.pth``.

Input cases follow nnU-Net's naming (``CASE_0000.ext`` [+ ``CASE_0001.ext`` ...]); a folder of plain
images (no channel suffix) is read one case per file. Outputs are ``CASE.ext`` (DICOM inputs become
``.nii.gz`` for volumes, ``.png`` for 2D), and with ``--probabilities`` also ``CASE.npz`` holding
``probabilities`` ``(K, *spatial)`` float16, as nnU-Net writes them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from medalloy.data.io import READABLE_ENDINGS, file_ending, read_image, write_label
from medalloy.engine.inference import Predictor
from medalloy.errors import MedalloyError
from medalloy.jsonio import atomic_path
from medalloy.runs import resolve_checkpoint

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


def find_input_cases(folder: str | Path) -> dict[str, list[Path]]:
    """Case id -> channel files, sorted by channel index."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MedalloyError("input folder not found", folder, "give a folder of images (nnU-Net naming CASE_0000.ext)")
    cases: dict[str, dict[int, Path]] = {}
    for p in sorted(folder.iterdir()):
        ending = file_ending(p)
        if p.name.startswith(".") or ending not in READABLE_ENDINGS:
            continue
        stem = p.name[: -len(ending)]
        m = _CHANNEL.match(stem)
        case, ch = (m["case"], int(m["ch"])) if m else (stem, 0)
        if ch in cases.setdefault(case, {}):
            raise MedalloyError(f"two files for case '{case}' channel {ch}", p, "keep one file per case and channel")
        cases[case][ch] = p
    if not cases:
        raise MedalloyError("no images found", folder, f"put images ending in one of {', '.join(READABLE_ENDINGS)} there")
    return {c: [chs[k] for k in sorted(chs)] for c, chs in cases.items()}


def output_ending(input_file: Path, ndim: int) -> str:
    ending = file_ending(input_file)
    if ending in (".jpg", ".jpeg"):
        return ".png"  # masks must be lossless
    if ending == ".dcm" or input_file.is_dir():
        return ".nii.gz" if ndim == 3 else ".png"
    return ending


def load_model(checkpoint: Path, device: str = "cpu", dataset: str | None = None):
    """Model, plan and record for any segmentation method's checkpoint (the loader its recipe
    registered for the record's ``method``); ``dataset`` names which of a multi-dataset model's
    datasets (tasks, modality, preprocessing) the images belong to. An exported ``.onnx`` graph runs
    through ONNX Runtime with its sidecar's plan; it was bound to its tasks at export, so
    ``dataset`` does not apply to it. An nnU-Net v2 folder or ``.pth`` checkpoint has one dataset."""
    from medalloy.interop.nnunet import is_nnunet_folder, load_nnunet_expert
    from medalloy.recipes.registry import load_checkpoint_model

    if Path(checkpoint).suffix == ".onnx":
        from medalloy.interop.onnx_runtime import load_onnx

        return load_onnx(checkpoint)
    if Path(checkpoint).suffix == ".pth" or is_nnunet_folder(checkpoint):
        return load_nnunet_expert(checkpoint, device)
    return load_checkpoint_model(checkpoint, device, dataset)


def _checkpoint(run: str | Path, which: str) -> Path:
    """:func:`~medalloy.runs.resolve_checkpoint`, or the ``.pth`` file of an nnU-Net v2 folder."""
    from medalloy.interop.nnunet import is_nnunet_folder, nnunet_checkpoint

    return nnunet_checkpoint(run, which) if is_nnunet_folder(run) else resolve_checkpoint(run, which)


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
) -> list[Path]:
    """Predict cases of a raw dataset by id (e.g. a held-out fold) into ``output_dir`` as
    ``CASE<file_ending>``; ``keep_labels`` names the labels to keep (others become background,
    e.g. to score a lung+heart model on a lung-only dataset). ``as_dataset`` (universal models):
    the training dataset whose tasks and preprocessing apply (default: this dataset's name, e.g.
    another name to test a source the model was asked about as if it came from that one).
    Returns the written files."""
    from medalloy.data.dataset import RawDataset

    dev = _device(device)
    ckpt_path = _checkpoint(run, checkpoint)
    ds = RawDataset(dataset)
    model, plan, record = load_model(ckpt_path, dev, dataset=as_dataset or ds.name)
    kept = _kept_values(plan.labels, keep_labels, ckpt_path)
    cases = [ds.case(cid) for cid in case_ids]  # unknown ids fail before any work
    out = Path(output_dir)
    targets = [out / f"{c.case_id}{ds.spec.file_ending}" for c in cases]
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        raise MedalloyError("prediction exists already", existing[0], "pass overwrite=True or choose another output folder")
    out.mkdir(parents=True, exist_ok=True)
    predictor = _predictor(model, plan, record, dev, precision, tta)
    for case, target in tqdm(list(zip(cases, targets)), desc="predict", unit="case", disable=not progress):
        image, _, meta = ds.load(case)
        label = predictor.predict(image, meta, case.images[0])
        if kept is not None:
            label = np.where(np.isin(label, kept), label, 0)
        write_label(target, label, meta)
    return targets


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
) -> list[Path]:
    """Predict every case of ``input_dir`` into ``output_dir``; returns the written label files.
    ``dataset``: for a model of several datasets, the one whose tasks and preprocessing apply."""
    dev = _device(device)
    ckpt_path = _checkpoint(run, checkpoint)
    model, plan, record = load_model(ckpt_path, dev, dataset=dataset)
    cases = find_input_cases(input_dir)
    out = Path(output_dir)
    existing = [c for c in cases if any(out.glob(f"{c}.*"))] if out.exists() else []
    if existing and not overwrite:
        raise MedalloyError(f"predictions exist already (e.g. {existing[0]})", out, "pass --overwrite or choose another --output")
    out.mkdir(parents=True, exist_ok=True)
    predictor = _predictor(model, plan, record, dev, precision, tta)
    written = []
    for case, files in tqdm(cases.items(), desc="predict", unit="case", disable=not progress):
        image, meta = read_image(files)
        probs = predictor.predict_probabilities(image, meta, files[0])
        label = predictor.to_labels(probs)
        target = out / f"{case}{output_ending(files[0], meta.ndim)}"
        write_label(target, label, meta if meta.kind != "dicom" or meta.ndim == 3 else None)
        if probabilities:
            with atomic_path(out / f"{case}.npz") as tmp:  # the temporary name ends in .npz, so numpy adds no second one
                np.savez_compressed(tmp, probabilities=probs.numpy().astype(np.float16))
        written.append(target)
    return written


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
) -> tuple[list[Path], str]:
    """One binary mask per task and case, ``output_dir/<task>/CASE.ext`` (1 where that task's own
    sigmoid exceeds 0.5: tasks may overlap, unlike in a label map), for models with one output per
    task (universal). The preprocessing is ``dataset``'s, else that of a training dataset that
    annotates the first task (of ``modality``, when given). Returns the files and a one-line note
    saying which preprocessing was used."""
    from medalloy.recipes.registry import load_checkpoint_tasks

    if not tasks:
        raise MedalloyError("no task given", fix="name at least one task with --task")
    dev = _device(device)
    ckpt_path = resolve_checkpoint(run, checkpoint)
    model, plan, record, note = load_checkpoint_tasks(ckpt_path, tasks, dataset=dataset, modality=modality, device=dev)
    cases = find_input_cases(input_dir)
    out = Path(output_dir)
    existing = [out / t for t in tasks if (out / t).exists() and any((out / t).iterdir())]
    if existing and not overwrite:
        raise MedalloyError("task masks exist already", existing[0], "pass --overwrite or choose another --output")
    predictor = Predictor(model, plan, device=dev, precision=precision, tta=tta, activation="sigmoid")
    written = []
    for case, files in tqdm(cases.items(), desc="predict", unit="case", disable=not progress):
        image, meta = read_image(files)
        probs = predictor.predict_probabilities(image, meta, files[0])
        for k, task in enumerate(tasks):
            target = out / task / f"{case}{output_ending(files[0], meta.ndim)}"
            target.parent.mkdir(parents=True, exist_ok=True)
            write_label(target, (probs[k] > 0.5).numpy().astype(np.uint8), meta if meta.kind != "dicom" or meta.ndim == 3 else None)
            written.append(target)
    return written, note


def describe(record: dict[str, Any]) -> str:
    tasks = ", ".join(t["dataset"] for t in record.get("tasks", []))
    return f"{record.get('method')} model for {tasks} (step {record.get('step')})"
