"""Leave-one-source-out rows of the evaluate stage: how each candidate does on a source it never saw.

A *domain* is one source of one dataset. For each domain, every candidate stage answers with a
model trained without it and is scored on that domain's training-split cases (the held-out cases
stay untouched, as everywhere in the pipeline), on the tasks some remaining source annotates (the
others are skipped and said). Each stage is rebuilt as it was built, from the stages before it
rebuilt without the domain:

- an experts stage: the experts of the other datasets (they never saw the domain), and, where the
  domain's dataset has other sources, its expert retrained without this one;
- a universal stage: retrained on every dataset's training cases but the domain's;
- an amalgamate stage: its experts stages as rebuilt, amalgamated on the remaining cases (one
  whose experts come from outside the pipeline cannot be rebuilt, and says so);
- a distill stage: a student of its teacher as rebuilt (per dataset for an experts teacher: the
  other datasets' students as they are, the domain's dataset's distilled again);
- an export stage: the same weights as the stage it exports, so that stage's rows are its own.

A model of several datasets answers as the domain's dataset where that dataset keeps other
sources, else as the remaining dataset that annotates the most of the tasks. Every retraining has
an equal part of the evaluate stage's budget (else its stage's own steps).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medalloy.jsonio import read_json, write_json_atomic
from medalloy.pipeline.config import recipe_config
from medalloy.pipeline.graph import StagePlan
from medalloy.pipeline.stages import Context, train_run

RETRAINED = ("experts", "universal", "amalgamate", "distill")


def _train_ids(ctx: Context, d: str) -> list[str]:
    split = ctx.datasets[d].split()
    if split is not None:
        return sorted(split["train"] + split["val"])
    return sorted(c.case_id for c in ctx.datasets[d].raw.labelled_cases())


def _labels(ctx: Context, d: str) -> dict[str, int]:
    return {k: v for k, v in ctx.datasets[d].raw.spec.labels.items() if v != 0}


def domains(ctx: Context, datasets: list[str]) -> list[tuple[str, str]]:
    return [(d, s) for d in datasets for s in ctx.datasets[d].raw.sources]


def _without(ctx: Context, datasets: list[str], d: str, source: str) -> dict[str, list[str]]:
    """Training ids of each dataset once ``source`` of ``d`` is left out (datasets left empty dropped)."""
    out = {}
    for e in datasets:
        ids = _train_ids(ctx, e)
        if e == d:
            by_id = {c.case_id: c.source for c in ctx.datasets[e].raw.labelled_cases()}
            ids = [i for i in ids if by_id[i] != source]
        if ids:
            out[e] = ids
    return out


def _halves(ids: list[str]) -> dict[str, list[str]]:
    """A training/validation split of ``ids`` (every fifth case validates), for a retraining."""
    val = ids[::5]
    return {"train": [i for i in ids if i not in set(val)], "val": val}


def _score(ctx: Context, model_path: Path, d: str, ids: list[str], tasks: list[str], folder: Path, as_dataset: str | None) -> dict[str, Any]:
    """Predict ``ids`` of ``d`` with the model, keep ``tasks`` (values mapped to ``d``'s), score them."""
    from medalloy.data.io import read_label, write_label
    from medalloy.evaluation import evaluate_folders
    from medalloy.pipeline.evaluate import keep_dataset_labels
    from medalloy.predict import predict_cases
    from medalloy.recipes.registry import load_model

    done = folder / "summary.json"
    if done.is_file():
        return read_json(done, "summary.json", "delete the folder")
    raw = ctx.datasets[d].raw
    own = _labels(ctx, d)
    _, plan, _ = load_model(model_path, "cpu", dataset=as_dataset)
    pred, gt = folder / "predictions", folder / "labels"
    predict_cases(model_path, ctx.datasets[d].path, ids, pred, keep_labels=tasks, device="cpu", overwrite=True, progress=ctx.progress, as_dataset=as_dataset)
    gt.mkdir(parents=True, exist_ok=True)
    keep_dataset_labels(pred, dict(plan.labels), own)  # the model's values to the dataset's, by name (other tasks are 0 already)
    for cid in ids:
        name = f"{cid}{raw.spec.file_ending}"
        g, gmeta = read_label(raw.case(cid).label)
        write_label(gt / name, np.where(np.isin(g, [own[t] for t in tasks]), g, 0), gmeta)
    return evaluate_folders(
        pred, gt, dataset=ctx.datasets[d].path, labels={t: own[t] for t in tasks}, out_dir=folder, overlays=False, overwrite=True, progress=False
    )


@dataclass
class Domain:
    """One source of one dataset, left out: the cases each dataset keeps, the tasks to score."""

    dataset: str
    source: str
    rest: dict[str, list[str]]  # training ids of each dataset without the domain
    tasks: list[str]
    ids: list[str]  # the domain's training-split cases, scored
    base: Path


@dataclass
class Without:
    """A stage as rebuilt without a domain: a model per dataset (experts, their students), or one
    model of several datasets (``model`` trained on ``datasets``)."""

    per_dataset: dict[str, Path] | None = None
    model: Path | None = None
    datasets: list[str] = field(default_factory=list)


@dataclass
class Job:
    """One retraining: ``train(config, resume, overwrite)`` into ``folder``."""

    stage: str
    folder: Path
    what: str
    train: Callable[[Any, bool, bool], dict[str, Any]]


Rebuilt = tuple[Without | None, list[Job], str | None]  # (the stage without the domain, its retrainings, why not)


def _kept(ctx: Context, stage: str, dom: Domain) -> list[str]:
    """The stage's datasets that keep cases without the domain."""
    trained = {d for m in ctx.models_of(stage) for d in m["datasets"]}
    return [e for e in dom.rest if e in trained]


def _experts(ctx: Context, stage: str, dom: Domain, done: dict[str, Without]) -> Rebuilt:
    from medalloy.recipes.expert import train_expert

    st = ctx.cfg.stages[stage]
    init = None
    if st.init is not None:  # type: ignore[attr-defined]
        init = ctx.path(ctx.models_of(st.init)[0]) if st.init in ctx.records else Path(st.init)  # type: ignore[attr-defined]
    per = {m["datasets"][0]: ctx.path(m) for m in ctx.models_of(stage) if m["datasets"][0] != dom.dataset}
    jobs = []
    if dom.dataset in _kept(ctx, stage, dom):  # the domain's dataset keeps other sources: its expert without this one
        d, folder = dom.dataset, dom.base / stage / dom.dataset
        ds, split = ctx.datasets[d], _halves(dom.rest[d])
        per[d] = folder
        jobs.append(Job(stage, folder, f"{stage} of {d} without source {dom.source}",
                        lambda cfg, resume, overwrite: train_expert(ds.path, folder, config=cfg, init=init, split=split, resume=resume, overwrite=overwrite, progress=ctx.progress)))  # fmt: skip
    return Without(per_dataset=per), jobs, None


def _multi(ctx: Context, stage: str, dom: Domain, train: Callable[..., dict[str, Any]]) -> Rebuilt:
    """One model of the stage's remaining datasets: ``train(paths, folder, cfg, splits, resume, overwrite)``."""
    keep = _kept(ctx, stage, dom)
    if not keep:
        return None, [], f"{stage} on {dom.dataset}/{dom.source}: no other dataset to train on"
    folder = dom.base / stage
    paths = [ctx.datasets[e].path for e in keep]
    splits = {ctx.datasets[e].raw.name: _halves(dom.rest[e]) for e in keep}
    job = Job(stage, folder, f"{stage} without {dom.dataset}/{dom.source}", lambda cfg, resume, overwrite: train(paths, folder, cfg, splits, resume, overwrite))
    return Without(model=folder, datasets=keep), [job], None


def _universal(ctx: Context, stage: str, dom: Domain, done: dict[str, Without]) -> Rebuilt:
    from medalloy.recipes.universal import train_universal

    return _multi(ctx, stage, dom, lambda paths, out, cfg, splits, resume, overwrite: train_universal(
        paths, out, config=cfg, splits=splits, resume=resume, overwrite=overwrite, progress=ctx.progress))  # fmt: skip


def _amalgamate(ctx: Context, stage: str, dom: Domain, done: dict[str, Without]) -> Rebuilt:
    from medalloy.recipes.amalgamate import train_amalgamate

    keep = set(_kept(ctx, stage, dom))
    experts: list[Path] = []
    for e in ctx.cfg.stages[stage].experts:  # type: ignore[attr-defined]
        if e not in done:
            why = "from outside the pipeline" if e not in ctx.records else f"of '{e}', which was not rebuilt"
            return None, [], f"{stage}: not retrained without a source (its experts {why})"
        w = done[e]
        experts += [p for d, p in (w.per_dataset or {}).items() if d in keep]
        if w.model is not None and keep & set(w.datasets):
            experts.append(w.model)
    return _multi(ctx, stage, dom, lambda paths, out, cfg, splits, resume, overwrite: train_amalgamate(
        paths, experts, out, config=cfg, splits=splits, resume=resume, overwrite=overwrite, progress=ctx.progress))  # fmt: skip


def _distill(ctx: Context, stage: str, dom: Domain, done: dict[str, Without]) -> Rebuilt:
    from medalloy.recipes.distill import train_distill

    teacher = ctx.records[stage].get("teacher")
    if teacher not in done:
        why = "from outside the pipeline" if teacher not in ctx.records else f"'{teacher}', which was not rebuilt"
        return None, [], f"{stage}: not retrained without a source (its teacher is {why})"
    t = done[teacher]

    def distil(paths: list[Path], teacher_path: Path, out: Path, cfg: Any, splits: Any, resume: bool, overwrite: bool) -> dict[str, Any]:
        return train_distill(paths, teacher_path, out, config=cfg, split=splits, resume=resume, overwrite=overwrite, progress=ctx.progress)

    if t.per_dataset is None:
        return _multi(ctx, stage, dom, lambda paths, out, cfg, splits, resume, overwrite: distil(paths, t.model, out, cfg, splits, resume, overwrite))  # type: ignore[arg-type]
    per = {m["datasets"][0]: ctx.path(m) for m in ctx.models_of(stage) if m["datasets"][0] != dom.dataset}
    jobs = []
    d = dom.dataset
    if d in _kept(ctx, stage, dom) and d in t.per_dataset:  # the domain's dataset: a student of its expert without the domain
        folder, path, split = dom.base / stage / d, ctx.datasets[d].path, {ctx.datasets[d].raw.name: _halves(dom.rest[d])}
        per[d] = folder
        jobs.append(Job(stage, folder, f"{stage}: a student of {d} without source {dom.source}",
                        lambda cfg, resume, overwrite: distil([path], t.per_dataset[d], folder, cfg, split, resume, overwrite)))  # type: ignore[index]  # fmt: skip
    return Without(per_dataset=per), jobs, None


REBUILD: dict[str, Callable[[Context, str, Domain, dict[str, Without]], Rebuilt]] = {
    "experts": _experts,
    "universal": _universal,
    "amalgamate": _amalgamate,
    "distill": _distill,
}


def _answers(ctx: Context, stage: str, w: Without, dom: Domain) -> list[tuple[str, Path, list[str], str | None]]:
    """(name, model, tasks, dataset to ask it as) of each model of a rebuilt stage that shares a task with the domain."""
    out = []
    for e, path in (w.per_dataset or {}).items():
        shared = [t for t in dom.tasks if t in _labels(ctx, e)]
        if shared:
            out.append((path.relative_to(ctx.root).as_posix(), path, shared, None))
    if w.model is not None:
        ask = dom.dataset if dom.dataset in w.datasets else max(w.datasets, key=lambda e: sum(t in _labels(ctx, e) for t in dom.tasks))
        shared = [t for t in dom.tasks if t in _labels(ctx, ask)]
        if shared:
            out.append((f"{stage} without {dom.dataset}/{dom.source}", w.model, shared, ctx.datasets[ask].raw.name))
    return out


def _with_inputs(ctx: Context, candidates: list[str]) -> list[str]:
    """The candidates and the stages they are built from (a student's teacher, an amalgamation's
    experts), in the order they ran: rebuilding a student rebuilds its teacher, scored or not."""
    need, todo = set(), list(candidates)
    while todo:
        n = todo.pop()
        if n in need or n not in ctx.records or ctx.records[n]["kind"] not in RETRAINED:
            continue
        need.add(n)
        todo += [ctx.records[n].get("teacher") or "", *getattr(ctx.cfg.stages[n], "experts", [])]
    return [n for n in ctx.records if n in need]


def _domain(ctx: Context, p: StagePlan, datasets: list[str], d: str, source: str, notes: list[str]) -> Domain | None:
    rest = _without(ctx, datasets, d, source)
    tasks = [t for t in _labels(ctx, d) if any(t in _labels(ctx, e) for e in rest)]
    skipped = [t for t in _labels(ctx, d) if t not in tasks]
    if skipped:
        notes.append(f"{d}/{source}: {', '.join(skipped)} skipped (no other source annotates it)")
    if not tasks:
        return None
    ids = [i for i in _train_ids(ctx, d) if ctx.datasets[d].raw.case(i).source == source]
    return Domain(d, source, rest, tasks, ids, ctx.root / p.name / "cross-source" / f"{d}-{source}")


def cross_source_rows(ctx: Context, p: StagePlan) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows, notes) of every candidate stage on every domain it can be scored on."""
    candidates = [n for n in ctx.records if n in p.needs and ctx.records[n]["kind"] in RETRAINED]
    stages = _with_inputs(ctx, candidates)
    notes = [f"{n}: scored by the rows of the stage it exports (the same weights)" for n in ctx.records if n in p.needs and ctx.records[n]["kind"] == "export"]

    def sets(names: list[str]) -> list[str]:
        return sorted({d for n in names for m in ctx.models_of(n) for d in m["datasets"]}, key=list(ctx.datasets).index)

    plans: list[tuple[Domain, list[tuple[str, Without, list[Job]]]]] = []
    for d, source in domains(ctx, sets(candidates)):
        dom = _domain(ctx, p, sets(stages), d, source, notes)
        if dom is None:
            continue
        done: dict[str, Without] = {}
        rebuilt = []
        for stage in stages:  # in the order they ran: a stage's inputs are rebuilt before it
            w, jobs, why = REBUILD[ctx.records[stage]["kind"]](ctx, stage, dom, done)
            if w is None:
                notes.append(why)  # type: ignore[arg-type]
                continue
            done[stage] = w
            rebuilt.append((stage, w, jobs))
        plans.append((dom, rebuilt))
    n_jobs = sum(len(jobs) for _, rebuilt in plans for _, _, jobs in rebuilt)
    budget = p.budget / n_jobs if p.budget and n_jobs else None
    rows: list[dict[str, Any]] = []
    for dom, rebuilt in plans:
        for stage, w, jobs in rebuilt:
            cfg = recipe_config(ctx.cfg.stages[stage], ctx.cfg.seed, ctx.cfg.device, budget)
            for job in jobs:
                ctx.log(f"{p.name}: {job.what}")
                train_run(job.folder, lambda resume, overwrite, job=job, cfg=cfg: job.train(cfg, resume, overwrite))
            for name, path, shared, as_dataset in _answers(ctx, stage, w, dom) if stage in candidates else []:
                out = dom.base / stage / "scores" / name.replace("/", "-").replace(" ", "_")
                result = _score(ctx, path, dom.dataset, dom.ids, shared, out, as_dataset)
                row = {
                    "stage": stage,
                    "model": name,
                    "dataset": dom.dataset,
                    "source": dom.source,
                    "tasks": shared,
                    "cases": len(dom.ids),
                    "summary": result["summary"],
                }
                write_json_atomic(out / "row.json", row)
                rows.append(row)
    return rows, notes


def cross_source_dice(rows: list[dict[str, Any]], stage: str, dataset: str) -> float | None:
    """A stage's mean Dice over its rows on ``dataset``'s sources (None: no row)."""
    vals = [r["summary"]["mean"]["dice"]["mean"] for r in rows if r["stage"] == stage and r["dataset"] == dataset]
    return float(np.mean(vals)) if vals else None
