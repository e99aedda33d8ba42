"""The resolved plan of a pipeline: each stage's order, inputs, budget and cache key.

A stage's key hashes the user's settings for it (its budget included), the content keys of its
datasets, the keys of the stages it reads and medalloy's version; never a measured time. A stage
whose key is unchanged since it finished is reused; a changed key reruns it and, through their keys,
every stage below it.
"""

from __future__ import annotations

import hashlib
import heapq
from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from typing import Any

from medalloy import __version__
from medalloy.errors import MedalloyError
from medalloy.pipeline.config import (
    DEFAULT_SHARES,
    MODEL_KINDS,
    AmalgamateStage,
    DistillStage,
    EvaluateStage,
    ExpertsStage,
    ExportStage,
    PipelineConfig,
    PretrainStage,
    StageBase,
    budget_minutes,
)
from medalloy.pipeline.datasets import ResolvedDataset, digest

# a folder outside the pipeline (an nnU-Net result, a run) is keyed by its files' names and sizes
_KEYED_SUFFIXES = (".safetensors", ".json", ".pth", ".onnx")


@dataclass
class StagePlan:
    name: str
    stage: StageBase
    needs: list[str]  # the stages it reads, by name
    datasets: list[str]  # the pipeline's dataset names it works on
    external: dict[str, str] = field(default_factory=dict)  # outside inputs (folders, files) -> their key
    budget: float | None = None  # minutes
    key: str = ""
    settings_key: str = ""  # the user's settings and budget alone (says why a key changed)
    upstream: dict[str, str] = field(default_factory=dict)  # name -> key of the stages it reads
    dataset_keys: dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.stage.kind


def _file_key(path: Path) -> str:
    """A file's sha256, or a folder's listing of model and record files (names and sizes)."""
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    if path.is_dir():
        return digest(sorted((p.relative_to(path).as_posix(), p.stat().st_size) for p in path.rglob("*") if p.suffix in _KEYED_SUFFIXES))
    raise MedalloyError("input not found", path, "fix the path in the pipeline file")


def _stage_or_path(value: str, stages: dict[str, StageBase], kinds: tuple[str, ...], who: str) -> str | Path:
    """A stage's name (of one of ``kinds``) or else an outside path, which must exist."""
    if value in stages:
        if stages[value].kind not in kinds:
            raise MedalloyError(f"stage '{who}' reads '{value}', a {stages[value].kind} stage", fix=f"name a stage of kind {' or '.join(kinds)}")
        return value
    path = Path(value)
    if not path.exists():
        known = ", ".join(n for n, s in stages.items() if s.kind in kinds) or "none"
        raise MedalloyError(
            f"stage '{who}' reads '{value}': no such stage (its {'/'.join(kinds)} stages: {known}) and no such path", fix="name a stage or an existing folder"
        )
    return path


def _wiring(name: str, stage: StageBase, stages: dict[str, StageBase], all_datasets: list[str]) -> tuple[list[str], list[str], dict[str, str]]:
    """(needs, datasets, external inputs) of one stage."""
    needs: list[str] = []
    external: dict[str, str] = {}

    def read(value: str, kinds: tuple[str, ...]) -> None:
        got = _stage_or_path(value, stages, kinds, name)
        if isinstance(got, Path):
            external[str(got)] = _file_key(got)
        else:
            needs.append(got)

    datasets = list(getattr(stage, "datasets", None) or all_datasets)
    unknown = [d for d in datasets if d not in all_datasets]
    if unknown:
        raise MedalloyError(f"stage '{name}' names dataset '{unknown[0]}', which the pipeline does not declare", fix=f"use one of {', '.join(all_datasets)}")
    if isinstance(stage, ExpertsStage) and stage.init is not None:
        read(stage.init, ("pretrain",))
    elif isinstance(stage, AmalgamateStage):
        for e in stage.experts:
            read(e, ("experts",))
    elif isinstance(stage, DistillStage):
        if stage.teacher != "best":
            read(stage.teacher, ("experts", "universal", "amalgamate"))
        else:
            needs += [n for n, s in stages.items() if s.kind in ("experts", "universal", "amalgamate")]
            if not needs:
                raise MedalloyError(
                    f"stage '{name}' asks for the best teacher, but the pipeline trains no experts, universal or amalgamate stage",
                    fix="add one or name a teacher run",
                )
    elif isinstance(stage, ExportStage):
        read(stage.from_, ("experts", "universal", "amalgamate", "distill"))
    elif isinstance(stage, EvaluateStage):
        for m in stage.models or [n for n, s in stages.items() if s.kind in MODEL_KINDS]:
            read(m, MODEL_KINDS)
    elif stage.kind == "report":
        needs += [n for n in stages if n != name]
    if stage.kind in ("export", "evaluate", "report"):
        datasets = []  # they see the datasets through the stages they read
    if isinstance(stage, PretrainStage):
        datasets = []
        for p in (stage.pairs, stage.text_only, stage.test_pairs):
            if isinstance(p, Path):
                external[str(p)] = _file_key(p)
    return needs, datasets, external


def trains(stage: StageBase) -> bool:
    """Whether a stage takes a share of the budget: the training kinds, and evaluate when it
    retrains without each source."""
    return stage.kind in DEFAULT_SHARES and (stage.kind != "evaluate" or bool(getattr(stage, "leave_one_source_out", False)))


def _budgets(cfg: PipelineConfig) -> dict[str, float | None]:
    """Minutes per training stage: its own ``budget``, else its share of what the pipeline's budget
    leaves (shares of the stages present, normalised)."""
    own = {n: budget_minutes(s.budget) for n, s in cfg.stages.items()}
    total = budget_minutes(cfg.budget)
    out: dict[str, float | None] = dict(own)
    shared = [n for n, s in cfg.stages.items() if own[n] is None and trains(s)]
    if total is not None and shared:
        left = total - sum(v for v in own.values() if v is not None)
        if left <= 0:
            raise MedalloyError(f"the stages' own budgets take all of the pipeline's {total:g} min", fix="raise `budget` or lower the stages' own")
        shares = {n: cfg.stages[n].share or DEFAULT_SHARES[cfg.stages[n].kind] for n in shared}
        for n in shared:
            out[n] = left * shares[n] / sum(shares.values())
    return out


def plan_stages(cfg: PipelineConfig, datasets: dict[str, ResolvedDataset]) -> list[StagePlan]:
    """Every stage, in the order it runs, with its key."""
    names = list(datasets)
    budgets = _budgets(cfg)
    plans = {}
    for name, stage in cfg.stages.items():
        needs, dss, external = _wiring(name, stage, cfg.stages, names)
        plans[name] = StagePlan(name, stage, needs, dss, external, budgets[name])
    order = _order(plans)
    for p in order:
        settings = p.stage.model_dump(mode="json", by_alias=True, exclude={"share", "budget"})
        p.settings_key = digest({"settings": settings, "budget_minutes": p.budget, "seed": cfg.seed, "version": __version__})
        p.dataset_keys = {d: datasets[d].key for d in p.datasets}
        p.upstream = {n: plans[n].key for n in p.needs}
        p.key = digest({"settings": p.settings_key, "datasets": p.dataset_keys, "stages": p.upstream, "external": p.external})
    return order


def _order(plans: dict[str, StagePlan]) -> list[StagePlan]:
    """The file's order, except that a stage runs after every stage it reads."""
    names = list(plans)
    sorter = TopologicalSorter({n: p.needs for n, p in plans.items()})
    try:
        sorter.prepare()
    except CycleError as exc:
        raise MedalloyError(f"stages read each other in a cycle: {' -> '.join(exc.args[1])}", fix="remove one of those links") from None
    ready: list[int] = []
    order = []
    while sorter.is_active():
        for n in sorter.get_ready():
            heapq.heappush(ready, names.index(n))
        n = names[heapq.heappop(ready)]
        order.append(plans[n])
        sorter.done(n)
    return order


def select(order: list[StagePlan], until: str | None, only: list[str] | None) -> set[str]:
    """The stages this invocation may run: all, those up to ``until`` (and what it reads), or ``only``."""
    names = [p.name for p in order]
    for n in [until] if until else []:
        if n not in names:
            raise MedalloyError(f"--until {n}: no such stage", fix=f"choose one of {', '.join(names)}")
    for n in only or []:
        if n not in names:
            raise MedalloyError(f"--only {n}: no such stage", fix=f"choose among {', '.join(names)}")
    if only:
        return set(only)
    if until:
        return set(names[: names.index(until) + 1])
    return set(names)


def describe_inputs(p: StagePlan, keys: dict[str, str]) -> str:
    parts = [*p.datasets] if p.kind in ("pretrain", "experts", "universal", "amalgamate", "distill") else []
    parts += [f"{n}[{keys[n][:8]}]" for n in p.needs if p.kind != "report"]
    parts += [Path(e).name for e in p.external]
    if p.kind == "report":
        parts.append("every stage above")
    return ", ".join(parts) or "-"


def input_summary(p: StagePlan) -> dict[str, Any]:
    """What the stage record keeps of its inputs, to say later what changed."""
    return {"settings": p.settings_key, "datasets": p.dataset_keys, "stages": p.upstream, "external": p.external}


def what_changed(old: dict[str, Any], p: StagePlan) -> str:
    """Why a stage's key differs from the one it ran with (``old``: its recorded inputs)."""
    if set(old.get("datasets") or {}) != set(p.datasets):
        return "its datasets changed"
    changed = [d for d in p.datasets if (old.get("datasets") or {}).get(d) != p.dataset_keys[d]]
    if changed:
        return f"dataset {', '.join(changed)} changed since it ran"
    if old.get("settings") != p.settings_key:
        return "its settings changed"
    if old.get("external") != p.external:
        return "an outside input changed"
    ran = [n for n in p.needs if (old.get("stages") or {}).get(n) != p.upstream[n]]
    return f"it reads {', '.join(ran) or 'a stage'}, which runs again"
