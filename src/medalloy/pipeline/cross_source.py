"""Leave-one-source-out rows of the evaluate stage: how each candidate does on a source it never saw.

A *domain* is one source of one dataset. For each domain, every candidate stage answers with a
model trained without it and is scored on that domain's training-split cases (the held-out cases
stay untouched, as everywhere in the pipeline), on the tasks some remaining source annotates (the
others are skipped and said):

- an experts stage: the experts of the other datasets that annotate those tasks (trained without
  the domain already), and, where the domain's dataset has other sources, its expert retrained
  without this one;
- a universal stage: retrained on every dataset's training cases but the domain's, asked as the
  domain's dataset where that dataset keeps other sources, else as the remaining dataset that
  annotates the most of the tasks.

Stages derived from others (amalgamate, distill, export) are not retrained per source; the report says so.
Each retraining has an equal part of the evaluate stage's budget (else its stage's own steps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medalloy.jsonio import read_json, write_json_atomic
from medalloy.pipeline.config import recipe_config
from medalloy.pipeline.graph import StagePlan
from medalloy.pipeline.stages import Context, model_entry, train_run

RETRAINED = ("experts", "universal")


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
    return evaluate_folders(pred, gt, dataset=ctx.datasets[d].path, labels={t: own[t] for t in tasks}, out_dir=folder, overlays=False, overwrite=True, progress=False)


def cross_source_rows(ctx: Context, p: StagePlan) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows, notes) of every candidate stage on every domain it can be scored on."""
    from medalloy.recipes.expert import train_expert
    from medalloy.recipes.universal import train_universal

    stages = [n for n in ctx.records if n in p.needs and ctx.records[n]["kind"] in RETRAINED]
    notes = [f"{n}: not retrained per source (derived from other stages)" for n in ctx.records if n in p.needs and ctx.records[n]["kind"] not in RETRAINED]
    all_sets = sorted({d for n in stages for m in ctx.models_of(n) for d in m["datasets"]}, key=list(ctx.datasets).index)
    jobs = _retrain_count(ctx, stages, all_sets)
    budget = p.budget / jobs if p.budget and jobs else None
    rows: list[dict[str, Any]] = []
    for d, source in domains(ctx, all_sets):
        rest = _without(ctx, all_sets, d, source)
        tasks = [t for t in _labels(ctx, d) if any(t in _labels(ctx, e) for e in rest)]
        skipped = [t for t in _labels(ctx, d) if t not in tasks]
        if skipped:
            notes.append(f"{d}/{source}: {', '.join(skipped)} skipped (no other source annotates it)")
        if not tasks:
            continue
        ids = [i for i in _train_ids(ctx, d) if ctx.datasets[d].raw.case(i).source == source]
        base = ctx.root / p.name / "cross-source" / f"{d}-{source}"
        for stage in stages:
            cfg = recipe_config(ctx.cfg.stages[stage], ctx.cfg.seed, ctx.cfg.device, budget)
            if ctx.records[stage]["kind"] == "experts":
                answers = []
                for m in ctx.models_of(stage):
                    e = m["datasets"][0]
                    shared = [t for t in tasks if t in _labels(ctx, e)]
                    if e != d and shared:
                        answers.append((m["name"], ctx.path(m), [e], shared, None))
                if d in rest:  # the domain's own dataset keeps other sources: its expert without this one
                    folder = base / stage / d
                    ds = ctx.datasets[d]
                    ctx.log(f"{p.name}: {stage} of {d} without source {source}")
                    summary = train_run(folder, lambda resume, overwrite: train_expert(ds.path, folder, config=cfg, split=_halves(rest[d]), resume=resume, overwrite=overwrite, progress=ctx.progress))
                    answers.append((model_entry(ctx, stage, folder, [d], summary)["name"], folder, [d], tasks, None))
            else:
                folder = base / stage
                keep = [e for e in rest if e in ctx.models_of(stage)[0]["datasets"]]
                if not keep:
                    notes.append(f"{stage} on {d}/{source}: no other dataset to train on")
                    continue
                ctx.log(f"{p.name}: {stage} without {d}/{source}")
                paths = [ctx.datasets[e].path for e in keep]
                splits = {ctx.datasets[e].raw.name: _halves(rest[e]) for e in keep}
                summary = train_run(folder, lambda resume, overwrite: train_universal(paths, folder, config=cfg, splits=splits, resume=resume, overwrite=overwrite, progress=ctx.progress))
                ask = d if d in keep else max(keep, key=lambda e: sum(t in _labels(ctx, e) for t in tasks))
                answers = [(f"{stage} without {d}/{source}", folder, keep, [t for t in tasks if t in _labels(ctx, ask)], ctx.datasets[ask].raw.name)]
            for name, path, _trained_on, shared, as_dataset in answers:
                out = base / stage / "scores" / name.replace("/", "-").replace(" ", "_")
                result = _score(ctx, path, d, ids, shared, out, as_dataset)
                row = {"stage": stage, "model": name, "dataset": d, "source": source, "tasks": shared, "cases": len(ids), "summary": result["summary"]}
                write_json_atomic(out / "row.json", row)
                rows.append(row)
    return rows, notes


def _retrain_count(ctx: Context, stages: list[str], datasets: list[str]) -> int:
    n = 0
    for d, source in domains(ctx, datasets):
        for stage in stages:
            if ctx.records[stage]["kind"] == "universal" or len(ctx.datasets[d].raw.sources) > 1:
                n += 1
    return n


def cross_source_dice(rows: list[dict[str, Any]], stage: str, dataset: str) -> float | None:
    """A stage's mean Dice over its rows on ``dataset``'s sources (None: no row)."""
    vals = [r["summary"]["mean"]["dice"]["mean"] for r in rows if r["stage"] == stage and r["dataset"] == dataset]
    return float(np.mean(vals)) if vals else None
