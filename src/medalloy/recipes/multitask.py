"""What the recipes that train one network on several datasets share (universal, amalgamate).

Tasks and modalities come from the datasets themselves: a task is a label *name* (so "lung" of a
lung+heart dataset and "lung" of a lung-only dataset are one task; ``task_names`` renames), a
modality is ``dataset.json["medalloy"]["modality"]`` (else the first channel name), compared
case-insensitively. Each dataset keeps its own preprocessing plan; the network answers one sigmoid
map per task asked, through :class:`~medalloy.models.task_bound.TaskBound` for prediction.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from torch import nn

from medalloy.data.dataset import RawDataset
from medalloy.data.mixed import MixedSource, dataset_weights, sample_count
from medalloy.data.sampling import PatchSampler
from medalloy.engine.inference import Predictor
from medalloy.errors import MedalloyError
from medalloy.models.task_bound import TaskBound
from medalloy.planning.input_fit import InputGeometry, choose_plan
from medalloy.planning.multi_dataset import check_plan_options, common_in_channels, own_plan
from medalloy.planning.plan import Plan, load_plan, save_plan
from medalloy.recipes.registry import register
from medalloy.recipes.scaffold import (
    C,
    Recipe,
    Run,
    ValidationSet,
    cache_cases,
    cases_of,
    dataset_splits,
    dice_validation,
    require_labelled,
    split_record,
)

UNKNOWN_MODALITY = "unknown"
REGISTRY_FILE = "registry.json"


class TaskRegistry(BaseModel):
    """Global task and modality ids, and which tasks each dataset labels."""

    tasks: list[str]
    modalities: list[str]  # the last one is "unknown"
    datasets: dict[str, dict[str, Any]]  # name -> {"task_ids", "labels" (task name -> label value), "modality"}

    @property
    def null_task(self) -> int:
        return len(self.tasks)


def tasks_in_label_order(entry: dict[str, Any]) -> list[str]:
    """A registry entry's task names in the order of their label values (the network's order)."""
    return sorted(entry["labels"], key=lambda t: entry["labels"][t])


def _task_name(dataset: str, label: str, names: dict[str, str]) -> str:
    return names.get(f"{dataset}:{label}", names.get(label, label))


def build_registry(datasets: list[RawDataset], task_names: dict[str, str] | None = None) -> TaskRegistry:
    """Tasks in order of first appearance (datasets in the given order, labels by value)."""
    names = task_names or {}
    tasks: list[str] = []
    modalities: list[str] = []
    per: dict[str, dict[str, Any]] = {}
    for ds in datasets:
        if ds.name in per:
            raise MedalloyError("dataset given twice", ds.root, "give each dataset once")
        fg = sorted(ds.spec.foreground_labels.items(), key=lambda kv: kv[1])
        if not fg:
            raise MedalloyError("dataset has no foreground labels", ds.root / "dataset.json", "declare labels besides background")
        ids, labels = [], {}
        for label, value in fg:
            task = _task_name(ds.name, label, names)
            if task in labels:
                raise MedalloyError(f"two labels of the dataset map to task '{task}'", ds.root / "dataset.json", "fix task_names")
            if task not in tasks:
                tasks.append(task)
            ids.append(tasks.index(task))
            labels[task] = int(value)
        modality = ds.spec.modality.strip().lower() or UNKNOWN_MODALITY
        if modality != UNKNOWN_MODALITY and modality not in modalities:
            modalities.append(modality)
        per[ds.name] = {"task_ids": ids, "labels": labels, "modality": modality}
    modalities.append(UNKNOWN_MODALITY)
    for entry in per.values():
        entry["modality_id"] = modalities.index(entry["modality"])
    return TaskRegistry(tasks=tasks, modalities=modalities, datasets=per)


def label_values(registry: TaskRegistry) -> dict[str, list[int]]:
    """Per dataset, its label values in the network's class order (background, then its tasks in label order)."""
    return {name: [0] + [e["labels"][t] for t in tasks_in_label_order(e)] for name, e in registry.datasets.items()}


def bound_model(net: nn.Module, registry: TaskRegistry, dataset: str, in_channels: int) -> TaskBound:
    """The network asked for one dataset's tasks (in its label-value order) and modality."""
    entry = registry.datasets[dataset]
    order = tasks_in_label_order(entry)
    return TaskBound(net, [registry.tasks.index(t) for t in order], entry["modality_id"], in_channels=in_channels)


def validation_sets(
    net: nn.Module, registry: TaskRegistry, plans: dict[str, Plan], cases: dict[str, list], in_channels: int, precision: str
) -> list[ValidationSet]:
    """Per dataset: its validation cases, scored through the network bound to its tasks."""

    def predictor(name: str):
        return lambda: Predictor(
            bound_model(net, registry, name, in_channels), plans[name], device=next(net.parameters()).device, precision=precision, activation="sigmoid"
        )

    return [ValidationSet(predictor(name), prepared, plans[name], name) for name, prepared in cases.items() if prepared]


def resumed_order(run: Run, dss: list[RawDataset], task_names: dict[str, str]) -> list[RawDataset]:
    """A resumed run keeps its task ids: its datasets in the order it was started with (the
    registry it wrote), or a one-line refusal when the datasets or task names differ."""
    saved = TaskRegistry.model_validate(run.read_json(REGISTRY_FILE))
    given = {d.name: d for d in dss}
    if set(given) != set(saved.datasets):
        raise MedalloyError(
            f"the run was trained on {', '.join(saved.datasets)}, not {', '.join(given)}", run.out / REGISTRY_FILE, "resume with the run's datasets"
        )
    ordered = [given[n] for n in saved.datasets]
    if build_registry(ordered, task_names) != saved:
        raise MedalloyError("task names differ from the run's", run.out / REGISTRY_FILE, "resume with the run's task_names")
    return ordered


def resolve_dataset(given: str, plans: dict[str, Plan], record: dict[str, Any], path: str | Path) -> str:
    """A training dataset's name from its name, its folder name (``Dataset103_Shenzhen``) or a
    path to it, compared case-insensitively."""
    folders = {t.get("folder", ""): t["dataset"] for t in record.get("tasks", []) if t.get("folder")}
    candidates = [given, Path(given).name, re.sub(r"^Dataset\d+_", "", Path(given).name)]
    for c in candidates:
        for name in plans:
            if c.lower() == name.lower():
                return name
        for folder, name in folders.items():
            if c.lower() == folder.lower():
                return name
    raise MedalloyError(f"the model was not trained on '{given}'", path, f"pass --dataset, one of {', '.join(plans)}")


def bind_dataset(
    net: nn.Module, registry: TaskRegistry, plans: dict[str, Plan], record: dict[str, Any], path: str | Path, dataset: str | None
) -> tuple[TaskBound, Plan, dict[str, Any]]:
    """A multi-dataset network as a single-dataset model (its tasks, modality and preprocessing)."""
    if dataset is None:
        if len(plans) != 1:
            raise MedalloyError(f"a model of {len(plans)} datasets: say which one the images come from", path, f"pass --dataset, one of {', '.join(plans)}")
        dataset = next(iter(plans))
    dataset = resolve_dataset(dataset, plans, record, path)
    return bound_model(net, registry, dataset, int(record["spec"]["in_channels"])).eval(), plans[dataset], record


def bind_tasks(
    net: nn.Module,
    registry: TaskRegistry,
    plans: dict[str, Plan],
    record: dict[str, Any],
    path: str | Path,
    tasks: list[str],
    dataset: str | None = None,
    modality: str | None = None,
    geometry: InputGeometry | None = None,
) -> tuple[TaskBound, Plan, dict[str, Any], str]:
    """The network asked for ``tasks`` (one sigmoid map each, in that order), with the
    preprocessing and modality of ``dataset``; without one, of the training dataset that annotates
    the first task (of modality ``modality``, when given) whose fingerprint is closest to the
    inputs' ``geometry`` (:func:`~medalloy.planning.input_fit.choose_plan`), else the first such
    dataset. Returns the model, a plan whose classes are the tasks, the record and a one-line note
    of the choice."""
    unknown = [t for t in tasks if t not in registry.tasks]
    if unknown:
        raise MedalloyError(f"the model has no task '{unknown[0]}'", path, f"use --task with one of {', '.join(registry.tasks)}")
    how = "given"
    if dataset is not None:
        dataset = resolve_dataset(dataset, plans, record, path)
    else:
        annotating = [n for n, e in registry.datasets.items() if tasks[0] in e["labels"]]
        if modality is not None:
            matching = [n for n in annotating if registry.datasets[n]["modality"] == modality.strip().lower()]
            if not matching:
                raise MedalloyError(
                    f"no training dataset of modality '{modality}' annotates '{tasks[0]}'",
                    path,
                    f"use --modality {' or '.join(sorted({registry.datasets[n]['modality'] for n in annotating}))}, or --dataset",
                )
            annotating, how = matching, f"modality {modality}"
        else:
            how = f"first dataset that annotates {tasks[0]}"
        dataset = annotating[0]
        if geometry is not None:
            fit = choose_plan({n: plans[n] for n in annotating}, geometry)
            dataset, how = fit.dataset, (f"modality {modality}; " if modality is not None else "") + fit.reason
    entry = registry.datasets[dataset]
    model = TaskBound(net, [registry.tasks.index(t) for t in tasks], entry["modality_id"], in_channels=int(record["spec"]["in_channels"])).eval()
    plan = plans[dataset].model_copy(
        update={"label_values": list(range(len(tasks) + 1)), "labels": {"background": 0, **{t: i + 1 for i, t in enumerate(tasks)}}}
    )
    note = f"tasks {', '.join(tasks)} with the preprocessing and modality ({entry['modality']}) of {dataset} ({how})"
    return model, plan, record, note


def dataset_sources(
    run: Run, dss: list[RawDataset], plans: dict[str, Plan], registry: TaskRegistry, ids: dict[str, dict[str, list[str]]], cfg: Any
) -> tuple[list[MixedSource], dict[str, list], list[int]]:
    """Per dataset: its cached training cases as a :class:`MixedSource` (weighted by
    ``cfg.dataset_weighting`` over :func:`sample_count`: slices of a volume a 2D plan slices count one
    by one), its cached validation cases, and its training-case count
    (``cfg``: ``augment``, ``dataset_weighting``, ``train.seed``)."""
    seed = cfg.train.seed
    sources, val_cases, sizes, samples = [], {}, [], []
    for ds in dss:
        plan, entry = plans[ds.name], registry.datasets[ds.name]
        prepared = cache_cases(ds, cases_of(ds, ids[ds.name]["train"]), plan, pad=True, seed=seed, desc=f"{ds.name}: caching train", progress=run.progress)
        val_cases[ds.name] = cache_cases(
            ds, cases_of(ds, ids[ds.name]["val"]), plan, pad=False, seed=seed, desc=f"{ds.name}: caching val", progress=run.progress
        )
        sampler = PatchSampler(prepared, plan.patch_size, 1, plan.dim, seed, plan.foreground_oversample, cfg.augment)
        order = tasks_in_label_order(entry)
        task_ids = [registry.tasks.index(k) for k in order]
        sources.append(MixedSource(ds.name, sampler, task_ids, list(range(1, len(order) + 1)), entry["modality_id"], batch_size=plan.batch_size))
        sizes.append(len(prepared))
        samples.append(sample_count(prepared, plan.dim))
    for src, w in zip(sources, dataset_weights(samples, cfg.dataset_weighting)):
        src.weight = float(w)
    return sources, val_cases, sizes


class MultiDatasetRecipe(Recipe[C]):
    """What the recipes of one network on several datasets share: the task registry (kept by a
    resumed run, in its order), each dataset's plan (``plans/<dataset>.json``; subclasses decide
    what the datasets share in :meth:`make_plans`), the splits and the cached training sources.
    ``cfg`` has the fields of :class:`~medalloy.recipes.config.MultiDatasetConfig`."""

    def __init__(self, cfg: C, dss: list[RawDataset], splits: dict[str, dict[str, list[str]]] | None = None, progress: bool = True):
        super().__init__(cfg, progress)
        self.dss, self.given_splits = dss, splits

    def check_datasets(self) -> None:
        for ds in self.dss:
            require_labelled(ds)
        check_plan_options(self.cfg.plan_options, [ds.name for ds in self.dss])

    def check(self) -> None:
        self.check_datasets()
        self.registry = build_registry(self.dss, self.cfg.task_names)

    def inputs(self) -> dict[str, Any]:
        return {"datasets": [str(d.root) for d in self.dss]}

    def prepare(self, run: Run) -> None:
        if run.kept(REGISTRY_FILE):
            self.dss = run.main(lambda: resumed_order(run, self.dss, self.cfg.task_names))
            self.registry = build_registry(self.dss, self.cfg.task_names)
        run.write_json(REGISTRY_FILE, self.registry.model_dump(mode="json"))
        self.plans = run.main(lambda: self._kept_or_new_plans(run))
        self.in_channels = common_in_channels(self.plans)

    def make_plans(self, owns: dict[str, Plan], values: dict[str, list[int]]) -> dict[str, Plan]:
        """The run's plans from each dataset's own (``values``: its classes in the model's order)."""
        raise NotImplementedError

    def _kept_or_new_plans(self, run: Run) -> dict[str, Plan]:
        """Rank 0: a resumed run's own plans, else new ones; saved under ``plans/``."""
        cfg = self.cfg
        saved = {ds.name: run.kept(f"plans/{ds.name}.json") for ds in self.dss}
        if all(saved.values()):
            plans = {name: load_plan(path) for name, path in saved.items()}
        else:
            owns = {ds.name: own_plan(ds, cfg.dim, cfg.plan_options.get(ds.name), cfg.max_2d_side, cfg.base_filters, cfg.max_filters) for ds in self.dss}
            plans = self.make_plans(owns, label_values(self.registry))
        common_in_channels(plans)  # refused before a plan is written
        for name, p in plans.items():
            save_plan(p, run.out / "plans" / f"{name}.json")
        return plans

    def choose_split(self, run: Run) -> dict[str, Any]:
        return split_record(self.cfg.fold, dataset_splits(run, self.dss, self.cfg, self.given_splits))

    def load_sources(self, run: Run, split: dict[str, Any]) -> None:
        """Cached training sources (``self.sources``), validation cases and training-case counts."""
        self.sources, self.val_cases, self.sizes = dataset_sources(run, self.dss, self.plans, self.registry, split["datasets"], self.cfg)

    def validation(self, net: nn.Module) -> Any:
        sets = validation_sets(net, self.registry, self.plans, self.val_cases, self.in_channels, self.cfg.train.precision)
        return dice_validation(sets) if sets else None

    def result(self, summary: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": self.record["name"], "fold": self.cfg.fold, "tasks": self.registry.tasks, "train_cases": dict(zip([d.name for d in self.dss], self.sizes)),
            "val_cases": {k: len(v) for k, v in self.val_cases.items()}, "params": self.record["params"],
        }  # fmt: skip


def register_multitask(method: str, load: Any) -> None:
    """Register a multi-dataset method for prediction, per dataset and per task, given its
    ``load(path, device) -> (net, registry, plans, record)``."""

    def for_dataset(path: str | Path, device: str = "cpu", dataset: str | None = None) -> tuple[TaskBound, Plan, dict[str, Any]]:
        net, registry, plans, record = load(path, device)
        return bind_dataset(net, registry, plans, record, path, dataset)

    def for_tasks(
        path: str | Path, tasks: list[str], dataset: str | None = None, modality: str | None = None, device: str = "cpu", geometry: InputGeometry | None = None
    ) -> tuple[TaskBound, Plan, dict[str, Any], str]:
        net, registry, plans, record = load(path, device)
        return bind_tasks(net, registry, plans, record, path, tasks, dataset, modality, geometry)

    register(method, for_dataset, tasks=for_tasks)
