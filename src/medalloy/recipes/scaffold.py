"""The one driver every recipe runs on, and the set-up recipes share around the training loop.

A method is a :class:`Recipe` subclass that holds only its own parts (checks, plans, split,
models, batches, step, record); :func:`run_recipe` does the rest in one order for every method:
open the run folder (rank 0), prepare, write ``config.yaml`` and ``split.json``, mark the run as
training, build the :class:`~medalloy.engine.trainer.TrainSpec`, train it, write ``run.json``::

    cfg = resolve_config(MyConfig, config, overrides, progress)   # a new object
    return run_recipe(MyRecipe(cfg, ...), out, resume=resume, overwrite=overwrite, progress=progress)

Under ``torchrun`` only rank 0 touches the run folder; the other ranks wait for its results
(:func:`~medalloy.engine.distributed.from_main`), so a refused ``--out`` stops every rank with
the same one-line error. The run-folder layout is in docs/design.md ("Run folders").
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import torch
import yaml
from pydantic import BaseModel
from tqdm.auto import tqdm

from medalloy.data.dataset import Case, RawDataset
from medalloy.data.preprocess import PreparedCase, foreground_coords, pad_to_patch, to_network_space
from medalloy.engine.distributed import DistInfo, from_main, init_distributed, resolve_device
from medalloy.engine.inference import Predictor
from medalloy.engine.trainer import TrainConfig, Trainer, TrainSpec
from medalloy.errors import MedalloyError
from medalloy.jsonio import read_json, write_json_atomic, write_text_atomic
from medalloy.planning.input_fit import as_trained
from medalloy.planning.plan import Plan
from medalloy.recipes.config import load_recipe_config
from medalloy.runs import prepare_output
from medalloy.seeding import step_rng

C = TypeVar("C", bound=BaseModel)
T = TypeVar("T")


def resolve_config(cls: type[C], config: str | Path | C | None, overrides: dict[str, Any], progress: bool) -> C:
    """The run's configuration: a YAML path or a ``cls`` instance (never modified: recipes work on
    a copy), with ``overrides`` (:func:`~medalloy.recipes.config.load_recipe_config`); ``progress=False`` silences the engine's bar too."""
    cfg = load_recipe_config(cls, config, overrides)
    cfg.train.progress = cfg.train.progress and progress  # type: ignore[attr-defined]
    return cfg


@dataclass
class Run:
    """A run folder being trained into, and the process (group) training it."""

    out: Path
    dist: DistInfo
    resume: bool
    progress: bool

    def main(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0 (which may write into the run folder); every rank gets its result."""
        return from_main(fn, self.dist)

    def write_json(self, name: str, obj: Any) -> None:
        if self.dist.is_main:
            write_json_atomic(self.out / name, obj)

    def kept(self, name: str) -> Path | None:
        """A resumed run's own file ``name`` (plan, split, registry), which it keeps; else None."""
        path = self.out / name
        return path if self.resume and path.exists() else None

    def read_json(self, name: str) -> Any:
        return read_json(self.out / name, name, "start the run again without --resume")

    def write_config(self, cfg: BaseModel) -> None:
        if self.dist.is_main:
            write_text_atomic(self.out / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

    def status(self, method: str, **fields: Any) -> None:
        """``run.json`` while training (replaced by the result at the end)."""
        self.write_json("run.json", {"method": method, **fields, "status": "training"})

    def train(self, spec: TrainSpec, train_cfg: TrainConfig, stage: str | None = None, resume: bool | None = None) -> dict[str, Any]:
        """Train ``spec``; a multi-stage recipe gives each earlier ``stage`` its own sub-folder
        (checkpoints, metrics, curve) and says whether that stage resumes."""
        out = self.out if stage is None else self.out / stage
        if stage is not None and self.dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
        return Trainer(spec, train_cfg, out).fit(resume=self.resume if resume is None else resume)


def open_run(out: str | Path, train_cfg: TrainConfig, overwrite: bool = False, resume: bool = False, progress: bool = True) -> Run:
    """Join the process group (if under torchrun), then let rank 0 alone prepare ``out``."""
    dist = init_distributed(resolve_device(train_cfg.device))

    def prepare() -> Path:
        path = prepare_output(out, overwrite=overwrite, resume=resume)
        if not resume:  # marks the folder as medalloy's at once, so --overwrite may replace a failed set-up
            write_json_atomic(path / "run.json", {"status": "preparing"})
        for stale in sorted(path.rglob(".tmp-*")):  # half-written files (or folders) of a killed run; their targets are whole
            if stale.is_dir():
                shutil.rmtree(stale)
            elif stale.exists():  # not inside a folder removed just before
                stale.unlink()
        return path

    path = from_main(prepare, dist)
    return Run(out=Path(path), dist=dist, resume=resume, progress=progress and dist.is_main)  # one set of bars, rank 0's


class Recipe(Generic[C]):
    """One method's own parts; :func:`run_recipe` does the rest, the same for every method.

    The driver calls the hooks in this order (every rank calls every hook; a hook that writes into
    the run folder does it through ``run.main``, which runs on rank 0 and hands every rank the result):

    1. ``check()``: refusals that must come before the run folder is touched (datasets, experts, teacher);
    2. ``prepare(run)``: what the run decides before its split (plans, task registry), kept by a resumed run;
    3. the config is written (``config.yaml``), then ``choose_split(run)`` on rank 0 (``split.json``);
    4. ``train_spec(run, split)``: cached cases, models (after ``seed_everything``), batches, step, validation, record;
    5. ``fit(run, spec)``: the engine trains it (a recipe of several stages trains each);
    6. ``result(summary)``: what ``run.json`` says beyond the method, its inputs and the engine's summary.

    ``inputs()`` names what the run trains on (datasets, experts, teacher, ...): ``run.json`` holds it
    from the start, so a failed run still says what it was.
    """

    METHOD: ClassVar[str] = ""

    def __init__(self, cfg: C, progress: bool = True):
        self.cfg = cfg
        self.progress = progress

    def check(self) -> None:
        """Refuse bad inputs before the run folder is touched."""

    def inputs(self) -> dict[str, Any]:
        return {}

    def prepare(self, run: Run) -> None:
        """Decide (rank 0, kept by a resumed run) what comes before the split: plans, registries."""

    def choose_split(self, run: Run) -> dict[str, Any]:
        """Rank 0: the run's split (a resumed run keeps its own)."""
        raise NotImplementedError

    def train_spec(self, run: Run, split: dict[str, Any]) -> TrainSpec:
        raise NotImplementedError

    def fit(self, run: Run, spec: TrainSpec) -> dict[str, Any]:
        return run.train(spec, self.cfg.train)  # type: ignore[attr-defined]

    def result(self, summary: dict[str, Any]) -> dict[str, Any]:
        return {}


def run_recipe(recipe: Recipe, out: str | Path, resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train ``recipe`` into the run folder ``out``; returns the run summary (``run.json``)."""
    started, clock = _now(), time.perf_counter()
    recipe.check()
    run = open_run(out, recipe.cfg.train, overwrite=overwrite, resume=resume, progress=progress)
    recipe.prepare(run)
    run.write_config(recipe.cfg)
    split = run.main(lambda: recipe.choose_split(run))
    run.write_json(SPLIT_FILE, split)
    run.status(recipe.METHOD, **recipe.inputs())
    spec = recipe.train_spec(run, split)
    summary = recipe.fit(run, spec)
    timings = {"started": started, "finished": _now(), "wall_seconds": round(time.perf_counter() - clock, 1)}
    result = {
        "method": recipe.METHOD, **recipe.inputs(), "status": "done", "spec": spec.record.get("spec"), **recipe.result(summary), **summary, "timings": timings,
    }  # fmt: skip
    run.write_json("run.json", result)
    return result


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def given_or_kept_plan(run: Run, plan: str | Path | Plan | None, make: Callable[[], Plan]) -> Plan:
    """Rank 0: the given plan (object or JSON path), else a resumed run's own ``plan.json``, else ``make()``."""
    from medalloy.planning.plan import load_plan

    if isinstance(plan, Plan):
        return plan
    if plan is not None:
        return load_plan(plan)
    kept = run.kept("plan.json")
    return load_plan(kept) if kept is not None else make()


def require_labelled(ds: RawDataset) -> None:
    if not ds.labelled_cases():
        raise MedalloyError("no labelled cases", ds.root / "labelsTr", "put a label file per case in labelsTr/")


def explicit_split(ds: RawDataset, split: dict[str, list[str]]) -> tuple[list[Case], list[Case]]:
    """Cases of a ``{"train": [ids], "val": [ids]}`` split, checked against the dataset."""
    known = {c.case_id: c for c in ds.cases}
    unknown = [i for part in ("train", "val") for i in split.get(part, []) if i not in known]
    if unknown:
        raise MedalloyError(f"split names cases not in the dataset: {unknown[:5]}", ds.root, "use case ids of imagesTr/")
    if not split.get("train"):
        raise MedalloyError("split has no training cases", ds.root, "give a non-empty 'train' list")
    return [known[i] for i in split["train"]], [known[i] for i in split.get("val", [])]


def select_cases(ds: RawDataset, fold: int, folds: int, seed: int, max_val: int, split: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """Training and validation case ids: an explicit ``split``, else the dataset's fold; labelled
    cases only, at most ``max_val`` validation cases."""
    from medalloy.data.splits import split_for_fold

    train, val = explicit_split(ds, split) if split is not None else split_for_fold(ds, fold, k=folds, seed=seed)
    return {"train": [c.case_id for c in train if c.label is not None], "val": [c.case_id for c in val if c.label is not None][:max_val]}


SPLIT_FILE = "split.json"


def split_record(fold: int | None, ids: dict[str, dict[str, list]], **extra: Any) -> dict[str, Any]:
    """``split.json``, one schema for every method: ``{"fold": f, "datasets": {name: {"train": [ids],
    "val": [ids]}}, ...}`` (pretraining's "dataset" is its table of pairs, its ids row numbers)."""
    return {"fold": fold, "datasets": {name: {"train": list(v["train"]), "val": list(v["val"])} for name, v in ids.items()}, **extra}


def kept_split(run: Run, names: Sequence[str]) -> dict[str, dict[str, list]] | None:
    """A resumed run's own split per dataset of ``names`` (also from a run written before the one
    schema, whose ``split.json`` held one dataset's ``train`` and ``val`` at the top); else None."""
    if not run.kept(SPLIT_FILE):
        return None
    saved = run.read_json(SPLIT_FILE)
    if "datasets" in saved:
        return {n: {"train": saved["datasets"][n]["train"], "val": saved["datasets"][n]["val"]} for n in names}
    return {names[0]: {"train": saved["train"], "val": saved["val"]}}


def dataset_splits(run: Run, dss: Sequence[RawDataset], cfg: Any, given: dict[str, dict[str, list[str]]] | None = None) -> dict[str, dict[str, list[str]]]:
    """Rank 0: per dataset, training and validation case ids: a resumed run's own, else the given
    split of that dataset, else its fold's (``cfg`` has ``fold``, ``folds``, ``max_val_cases`` and ``train.seed``)."""
    kept = kept_split(run, [ds.name for ds in dss]) if not given else None
    if kept is not None:
        return kept
    given = given or {}
    return {ds.name: select_cases(ds, cfg.fold, cfg.folds, cfg.train.seed, cfg.max_val_cases, given.get(ds.name)) for ds in dss}


def cases_of(ds: RawDataset, ids: Sequence[str]) -> list[Case]:
    return [ds.case(i) for i in ids]


def cache_cases(
    ds: RawDataset, cases: list[Case], plan: Plan, pad: bool, seed: int, desc: str, progress: bool = True, rescale: bool = False
) -> list[PreparedCase]:
    """Read, move to network space, pad to the patch and index foreground, once per case (cached).
    ``rescale``: each image (and label) at the plan's typical size (:func:`~medalloy.planning.input_fit.as_trained`),
    as prediction brings natural images of another size."""
    out = []
    for case in tqdm(cases, desc=desc, unit="case", disable=not progress, leave=False):
        image, label, meta = ds.load(case)
        image, label = to_network_space(image, label, as_trained(meta, plan) if rescale else meta, plan, case.images[0])
        pads: list = []
        if pad:
            image, label, pads = pad_to_patch(image, label, plan.patch_size)
        fg = foreground_coords(label, plan.num_classes, step_rng(seed, "fg", case.case_id)) if label is not None else {}
        out.append(PreparedCase(case.case_id, image, label, meta, case.source, fg, pads))
    return out


def task_entry(ds: RawDataset) -> dict[str, Any]:
    """What a checkpoint record says of one dataset it answers for (its ``tasks`` block)."""
    return {"dataset": ds.name, "folder": ds.root.name, "labels": ds.spec.labels, "modality": ds.spec.modality, "file_ending": ds.spec.file_ending}


def label_names(plan: Plan) -> dict[int, str]:
    """Network class index -> label name (0 is background)."""
    by_value = {v: name for name, v in plan.labels.items()}
    return {i: by_value[v] for i, v in enumerate(plan.label_values) if v in by_value}


@dataclass
class ValidationSet:
    """One dataset's cases scored with one predictor; metric keys are ``val/<dataset>/dice_<label>``
    for the network classes in ``classes`` (None: all; a partially labelled dataset scores the ones it labels)."""

    predictor: Callable[[], Predictor]
    cases: list[PreparedCase]
    plan: Plan
    dataset: str
    classes: list[int] | None = None


def dice_validation(sets: list[ValidationSet]) -> Callable[[dict], dict[str, float]]:
    """Validation by whole-case prediction in network space: Dice per label over each set's cases,
    and ``val/dice``, the mean of those."""
    from medalloy.engine.metrics import batch_dice

    def validate(models: dict) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for vs in sets:
            predictor = vs.predictor()
            names = label_names(vs.plan)
            per_case = []
            for c in vs.cases:
                probs = predictor.predict_network_space(c.image)
                target = torch.from_numpy(c.label.astype(np.int64))
                per_case.append(batch_dice(predictor.to_classes(probs)[None], target[None], vs.plan.num_classes))
            dice = torch.stack(per_case).mean(0)
            for k, d in enumerate(dice):
                if vs.classes is None or k + 1 in vs.classes:
                    metrics[f"val/{vs.dataset}/dice_{names[k + 1]}"] = float(d)
        if metrics:
            metrics["val/dice"] = float(np.mean(list(metrics.values())))
        return metrics

    return validate
