"""A pipeline's datasets as nnU-Net raw folders, each with a content key.

The key is what a stage's cache key sees of a dataset: every file's name and size under the
dataset's folders and ``dataset.json``'s bytes (no image is read, so keying a large dataset costs a
directory listing). Imported and synthetic datasets are written once into ``RUN/data/<name>``,
keyed by what they are made from.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medalloy import __version__
from medalloy.data.check import check_dataset, format_report
from medalloy.data.dataset import RawDataset
from medalloy.errors import MedalloyError
from medalloy.jsonio import read_json, write_json_atomic
from medalloy.pipeline.config import DatasetEntry

KEY_FILE = "pipeline-data.json"
_FOLDERS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs")


@dataclass(frozen=True)
class ResolvedDataset:
    name: str  # the pipeline's name for it
    path: Path  # an nnU-Net raw folder
    key: str  # content key
    held_out: float | None = None  # without labelsTs: the share of cases held out for evaluation

    @property
    def has_test_labels(self) -> bool:
        return (self.path / "labelsTs").is_dir() and any((self.path / "labelsTs").iterdir())

    def split(self) -> dict[str, list[str]] | None:
        """None where the dataset holds its own held-out cases (imagesTs + labelsTs: the recipes split
        imagesTr as they always do); else ``{"train", "val", "test"}`` of its labelled cases, by
        patient: ``test`` (fold 0 of ``1 / held_out`` folds) is never trained or selected on,
        ``val`` is fold 0 of 5 of the rest."""
        from medalloy.data.splits import kfold_splits

        if self.held_out is None:
            return None
        cases = self.raw.labelled_cases()
        test = set(kfold_splits(cases, k=max(2, round(1 / self.held_out)), seed=0)[0]["val"])
        rest = [c for c in cases if c.case_id not in test]
        val = set(kfold_splits(rest, k=5, seed=0)[0]["val"])
        return {"train": sorted(c.case_id for c in rest if c.case_id not in val), "val": sorted(val), "test": sorted(test)}

    @property
    def raw(self) -> RawDataset:
        return RawDataset(self.path)


def digest(obj: Any) -> str:
    """sha256 of ``obj`` as canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _listing(folder: Path) -> list[tuple[str, int]]:
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def content_key(root: Path) -> str:
    """A raw dataset's key: its folders' file names and sizes, and ``dataset.json``."""
    spec = root / "dataset.json"
    if not spec.is_file():
        raise MedalloyError("no dataset.json: not an nnU-Net raw dataset", root, "give a Dataset###_Name folder, or import image/mask folders")
    files = {f: _listing(root / f) for f in _FOLDERS if (root / f).is_dir()}
    return digest({"dataset.json": hashlib.sha256(spec.read_bytes()).hexdigest(), "files": files})


def _source_key(entry: DatasetEntry) -> str:
    """What an imported or synthetic dataset is made from (checked before anything is written)."""
    if entry.synthetic is not None:
        return digest({"synthetic": entry.synthetic.model_dump(), "version": __version__})
    parts = []
    for imp in entry.import_ or []:
        for folder in (imp.images, imp.masks):
            if not folder.is_dir():
                raise MedalloyError("import folder not found", folder, "fix the dataset's import paths in the pipeline file")
        parts.append({"source": imp.source, "images": _listing(imp.images), "masks": _listing(imp.masks)})
    return digest({"import": parts, "labels": entry.labels, "modality": entry.modality})


def _build(name: str, entry: DatasetEntry, target: Path, progress: bool) -> Path:
    """Write an imported or synthetic dataset into ``target`` (built beside it, then renamed)."""
    tmp = target.with_name(f".tmp-{target.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    if entry.synthetic is not None:
        from medalloy.data.synth import generate_dataset

        s = entry.synthetic
        made = generate_dataset(s.name, tmp, seed=s.seed, cases_per_source=s.cases_per_source, test_cases_per_source=s.test_cases_per_source, progress=progress)
        built = made
    else:
        from medalloy.data.importer import import_folders

        built = tmp / f"Dataset999_{name}"
        for imp in entry.import_ or []:
            labels = {"background": 0, **entry.labels} if entry.labels else None
            import_folders(imp.images, imp.masks, built, imp.source, labels=labels, progress=progress, modality=entry.modality)
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    built.rename(target)
    shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_datasets(entries: dict[str, DatasetEntry], data_dir: Path, build: bool, progress: bool = True, held_out: float = 0.2) -> dict[str, ResolvedDataset]:
    """Each entry as a raw folder with its key (which includes the held-out share where one is
    drawn). ``build=False`` (a dry run) writes nothing: an imported or synthetic dataset not yet
    built is keyed by its sources alone."""
    out = {}
    for name, ds in _resolve(entries, data_dir, build, progress).items():
        entry = entries[name]
        # known from the entry, so a dry run before the data is built keys it the same
        own_test = entry.synthetic.test_cases_per_source > 0 if entry.synthetic else False if entry.import_ else ds.has_test_labels
        drawn = None if own_test else entry.held_out or held_out
        out[name] = ResolvedDataset(name, ds.path, digest({"content": ds.key, "held_out": drawn}) if drawn else ds.key, drawn)
    return out


def _resolve(entries: dict[str, DatasetEntry], data_dir: Path, build: bool, progress: bool) -> dict[str, ResolvedDataset]:
    out = {}
    for name, entry in entries.items():
        if entry.path is not None:
            if not entry.path.is_dir():
                raise MedalloyError(f"dataset '{name}' not found", entry.path, "fix its path in the pipeline file (or set the variable it uses)")
            out[name] = ResolvedDataset(name, entry.path, content_key(entry.path))
            continue
        source = _source_key(entry)
        target = data_dir / name
        # keyed by what it is made from (which decides its content), so a dry run keys it the same before it is built
        key = digest({"source": source})
        kept = read_json(target / KEY_FILE, KEY_FILE, "") if (target / KEY_FILE).is_file() else None
        if kept is None or kept.get("source") != source:
            if not build:
                out[name] = ResolvedDataset(name, target, key)
                continue
            if progress:
                print(f"[medalloy pipeline] dataset {name}: {'building' if kept is None else 'its sources changed, building again'} into {target}", flush=True)
            _build(name, entry, target, progress)
            write_json_atomic(target / KEY_FILE, {"source": source})
        out[name] = ResolvedDataset(name, target, key)
    return out


def check_datasets(datasets: dict[str, ResolvedDataset], checked: dict[str, str]) -> None:
    """``medalloy data check`` on each dataset whose key was not checked before (``checked``:
    name -> key, updated); the first with problems stops the pipeline before any training."""
    for name, ds in datasets.items():
        if checked.get(name) == ds.key:
            continue
        problems = check_dataset(ds.path, progress=False)
        if problems:
            raise MedalloyError(f"dataset '{name}' fails its check:\n{format_report(problems, ds.path)}", ds.path, "fix the dataset (`medalloy data check`)")
        checked[name] = ds.key
