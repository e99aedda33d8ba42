"""What each stage kind does: it calls its recipe (or export, prediction, evaluation) and returns
its record: the models it made (``models``: where each lies, which datasets it answers, its size
and validation Dice) and a summary.

A training stage's runs lie in ``RUN/<stage>/`` (one per dataset for experts, and for students of
an experts teacher). A stage started again after a kill resumes each run from its last checkpoint
(the recipes' ``resume``), reuses the runs that finished, and starts afresh one killed before its
first checkpoint, so it ends with the weights an uninterrupted run has.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from medalloy.errors import MedalloyError
from medalloy.jsonio import read_json
from medalloy.pipeline.config import PipelineConfig, recipe_config
from medalloy.pipeline.datasets import ResolvedDataset
from medalloy.pipeline.graph import StagePlan


@dataclass
class Context:
    root: Path
    cfg: PipelineConfig
    datasets: dict[str, ResolvedDataset]
    records: dict[str, dict[str, Any]]  # finished stages' records, by name
    progress: bool  # bars inside the stages
    lines: bool = True  # a line as each part of a stage starts

    def log(self, msg: str) -> None:
        if self.lines:
            tqdm.write(f"[medalloy pipeline] {msg}", file=sys.stdout)

    def models_of(self, stage: str) -> list[dict[str, Any]]:
        return self.records[stage]["models"]

    def path(self, model: dict[str, Any]) -> Path:
        return self.root / model["path"]

    def recipe_config(self, p: StagePlan, budget: float | None) -> Any:
        return recipe_config(p.stage, self.cfg.seed, self.cfg.device, budget)

    def split_of(self, dataset: str) -> dict[str, list[str]] | None:
        """The training and validation cases of a dataset whose held-out cases the pipeline drew
        (none of its test cases), else None (the recipe splits imagesTr as always)."""
        split = self.datasets[dataset].split()
        return None if split is None else {"train": split["train"], "val": split["val"]}

    def splits_of(self, datasets: list[str]) -> dict[str, dict[str, list[str]]] | None:
        """:meth:`split_of` of each, by the name the recipes know the dataset by."""
        out = {self.datasets[d].raw.name: s for d in datasets if (s := self.split_of(d)) is not None}
        return out or None


def train_run(folder: Path, train: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """A finished run's ``run.json``; else ``train(resume=..., overwrite=...)`` into ``folder``,
    resumed where a checkpoint exists, afresh where none does. Under torchrun rank 0 looks at the
    folder and every rank follows its answer (a rank that looked while rank 0 wrote would differ)."""
    from medalloy.engine.distributed import current, from_main

    def decide() -> tuple[str, dict[str, Any] | None]:
        done = folder / "run.json"
        if done.is_file():
            record = read_json(done, "run.json", "delete the folder to train it again")
            if record.get("status") == "done":
                return "done", record
        resume = done.is_file() and any(folder.rglob("last.safetensors"))
        if folder.exists() and not resume:
            shutil.rmtree(folder)  # a run killed before its first checkpoint: nothing to keep
        return ("resume" if resume else "fresh"), None

    how, record = from_main(decide, current())
    if how == "done" and record is not None:
        return record
    return train(resume=how == "resume", overwrite=False)


def val_dice(summary: dict[str, Any], dataset: str) -> float | None:
    """Validation Dice of ``dataset`` (its name inside the run) at the run's best checkpoint."""
    metrics = (summary.get("best") or {}).get("metrics") or {}
    own = [v for k, v in metrics.items() if k.startswith(f"val/{dataset}/dice_")]
    if own:
        return sum(own) / len(own)
    return metrics.get("val/dice")


def model_entry(ctx: Context, stage: str, folder: Path, datasets: list[str], summary: dict[str, Any], fmt: str = "run") -> dict[str, Any]:
    name = folder.relative_to(ctx.root).as_posix()
    return {
        "name": name,
        "stage": stage,
        "path": name,
        "format": fmt,
        "datasets": datasets,
        "params": summary.get("params"),
        "val_dice": {d: val_dice(summary, ctx.datasets[d].raw.name) for d in datasets},
        "seconds": summary.get("seconds"),
        "steps": summary.get("steps"),
    }


def _dice_line(models: list[dict[str, Any]]) -> str:
    vals = [f"{d} {v:.3f}" for m in models for d, v in m.get("val_dice", {}).items() if v is not None]
    return f"validation Dice {', '.join(vals)}" if vals else ""


@dataclass(frozen=True)
class ExpertJob:
    """One expert of an experts stage, as a picklable job for a worker process."""

    dataset: Path
    folder: Path
    config: dict[str, Any]
    init: Path | None
    split: dict[str, list[str]] | None
    progress: bool


def train_expert_job(job: ExpertJob) -> dict[str, Any]:
    """Train (or resume, or reuse) one expert; in a worker process, on one torch thread."""
    from medalloy.recipes.expert import ExpertConfig, train_expert

    cfg = ExpertConfig.model_validate(job.config)
    return train_run(
        job.folder,
        lambda resume, overwrite: train_expert(
            job.dataset, job.folder, config=cfg, init=job.init, split=job.split, resume=resume, overwrite=overwrite, progress=job.progress
        ),
    )


def _one_thread_job(job: ExpertJob) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    return train_expert_job(job)


def run_experts(ctx: Context, p: StagePlan) -> dict[str, Any]:
    st = p.stage
    init = None
    if st.init is not None:  # type: ignore[attr-defined]
        init = ctx.path(ctx.models_of(st.init)[0]) if st.init in ctx.records else Path(st.init)  # type: ignore[attr-defined]
    from medalloy.engine.distributed import current

    # under torchrun the ranks share each expert (data-parallel), one expert after another
    workers = 1 if current().enabled else min(ctx.cfg.jobs, len(p.datasets))
    # in parallel each expert has the stage's wall-clock time for its share of the datasets
    cfg = ctx.recipe_config(p, p.budget * workers / len(p.datasets) if p.budget else None)
    jobs = [
        ExpertJob(ctx.datasets[d].path, ctx.root / p.name / d, cfg.model_dump(mode="json"), init, ctx.split_of(d), ctx.progress and workers == 1)
        for d in p.datasets
    ]
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx.log(f"{p.name}: {len(jobs)} experts, {workers} at a time (one thread each)")
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            summaries = list(pool.map(_one_thread_job, jobs))
    else:
        summaries = []
        for d, job in zip(p.datasets, jobs):
            ctx.log(f"{p.name}: expert of {d}")
            summaries.append(train_expert_job(job))
    models = [model_entry(ctx, p.name, job.folder, [d], summary) for d, job, summary in zip(p.datasets, jobs, summaries)]
    return {"models": models, "note": _dice_line(models)}


def _multi(ctx: Context, p: StagePlan, train: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    folder = ctx.root / p.name
    summary = train_run(folder, train)
    models = [model_entry(ctx, p.name, folder, p.datasets, summary)]
    return {"models": models, "note": _dice_line(models)}


def run_universal(ctx: Context, p: StagePlan) -> dict[str, Any]:
    from medalloy.recipes.universal import train_universal

    cfg = ctx.recipe_config(p, p.budget)
    paths = [ctx.datasets[d].path for d in p.datasets]
    return _multi(
        ctx,
        p,
        lambda resume, overwrite: train_universal(
            paths, ctx.root / p.name, config=cfg, splits=ctx.splits_of(p.datasets), resume=resume, overwrite=overwrite, progress=ctx.progress
        ),
    )


def run_amalgamate(ctx: Context, p: StagePlan) -> dict[str, Any]:
    from medalloy.recipes.amalgamate import train_amalgamate

    experts: list[Path] = []
    for e in p.stage.experts:  # type: ignore[attr-defined]
        if e in ctx.records:
            experts += [ctx.path(m) for m in ctx.models_of(e) if set(m["datasets"]) & set(p.datasets)]
        else:
            experts.append(Path(e))
    cfg = ctx.recipe_config(p, p.budget)
    paths = [ctx.datasets[d].path for d in p.datasets]
    return _multi(
        ctx,
        p,
        lambda resume, overwrite: train_amalgamate(
            paths, experts, ctx.root / p.name, config=cfg, splits=ctx.splits_of(p.datasets), resume=resume, overwrite=overwrite, progress=ctx.progress
        ),
    )


def best_teacher(ctx: Context, candidates: list[str], datasets: list[str]) -> str:
    """The stage whose models have the highest mean validation Dice on ``datasets`` (never the
    held-out cases); a stage that does not answer every dataset is not a candidate."""
    scores = {}
    for name in candidates:
        vals = []
        for d in datasets:
            got = [m["val_dice"].get(d) for m in ctx.models_of(name) if d in m["datasets"]]
            vals.append(got[0] if got and got[0] is not None else None)
        if all(v is not None for v in vals):
            scores[name] = sum(vals) / len(vals)  # type: ignore[arg-type]
    if not scores:
        raise MedalloyError(f"no teacher stage answers every dataset of the student ({', '.join(datasets)})", fix="name the teacher stage")
    return max(scores, key=lambda n: (scores[n], -candidates.index(n)))


def run_distill(ctx: Context, p: StagePlan) -> dict[str, Any]:
    from medalloy.recipes.distill import train_distill

    st = p.stage
    teacher = st.teacher  # type: ignore[attr-defined]
    if teacher == "best":
        teacher = best_teacher(ctx, p.needs, p.datasets)
        ctx.log(f"{p.name}: the best teacher by validation Dice is '{teacher}'")
    cfg = ctx.recipe_config(p, None)
    per_dataset = teacher in ctx.records and ctx.records[teacher]["kind"] == "experts"
    groups = [[d] for d in p.datasets] if per_dataset else [p.datasets]
    if p.budget:
        cfg.train.time_budget_minutes = p.budget / len(groups)  # type: ignore[attr-defined]
    models = []
    for group in groups:
        if teacher in ctx.records:
            owners = [m for m in ctx.models_of(teacher) if set(group) <= set(m["datasets"])]
            if not owners:
                raise MedalloyError(f"stage '{p.name}': teacher '{teacher}' has no model of {', '.join(group)}", fix="list only datasets the teacher learned")
            teacher_path = ctx.path(owners[0])
        else:
            teacher_path = Path(teacher)
        folder = ctx.root / p.name / group[0] if per_dataset else ctx.root / p.name
        paths = [ctx.datasets[d].path for d in group]
        ctx.log(f"{p.name}: a student of {teacher_path.relative_to(ctx.root) if teacher_path.is_relative_to(ctx.root) else teacher_path} on {', '.join(group)}")
        split = ctx.splits_of(group)

        def train(resume: bool, overwrite: bool, paths=paths, teacher_path=teacher_path, folder=folder, split=split) -> dict[str, Any]:
            return train_distill(paths, teacher_path, folder, config=cfg, split=split, resume=resume, overwrite=overwrite, progress=ctx.progress)

        summary = train_run(folder, train)
        entry = model_entry(ctx, p.name, folder, group, summary)
        entry["teacher"] = teacher_path.relative_to(ctx.root).as_posix() if teacher_path.is_relative_to(ctx.root) else str(teacher_path)
        models.append(entry)
    return {"models": models, "teacher": teacher, "note": _dice_line(models)}


def run_export(ctx: Context, p: StagePlan) -> dict[str, Any]:
    from medalloy.export import export_onnx

    st = p.stage
    source = st.from_  # type: ignore[attr-defined]
    models = []
    for m in ctx.models_of(source) if source in ctx.records else []:
        many = len(m["datasets"]) > 1
        for d in m["datasets"]:
            stem = m["name"].replace("/", "-") + (f"-{d}" if many else "")
            out = ctx.root / p.name / f"{stem}.onnx"
            ctx.log(f"{p.name}: {m['name']}{f' ({d})' if many else ''} -> {out.relative_to(ctx.root)}")
            export_onnx(ctx.path(m), out, dataset=ctx.datasets[d].raw.name if many else None, opset=st.opset, overwrite=True, quantize=st.quantize)  # type: ignore[attr-defined]
            models.append(
                {
                    **m,
                    "name": f"{p.name}/{stem}",
                    "stage": p.name,
                    "path": out.relative_to(ctx.root).as_posix(),
                    "format": "onnx",
                    "datasets": [d],
                    "from": m["name"],
                }
            )
    if source not in ctx.records:
        raise MedalloyError(f"stage '{p.name}' exports '{source}', which has not finished", fix=f"run '{source}' first")
    return {"models": models, "note": f"{len(models)} ONNX model(s)"}


# stages whose recipes train: every rank runs them (data-parallel under torchrun); the others run on rank 0
TRAINING_KINDS = ("pretrain", "experts", "universal", "amalgamate", "distill")

RUNNERS: dict[str, Callable[[Context, StagePlan], dict[str, Any]]] = {
    "experts": run_experts,
    "universal": run_universal,
    "amalgamate": run_amalgamate,
    "distill": run_distill,
    "export": run_export,
}


def runner_for(kind: str) -> Callable[[Context, StagePlan], dict[str, Any]]:
    if kind in RUNNERS:
        return RUNNERS[kind]
    if kind == "pretrain":
        from medalloy.pipeline.pretrain_stage import run_pretrain

        return run_pretrain
    if kind == "evaluate":
        from medalloy.pipeline.evaluate import run_evaluate

        return run_evaluate
    from medalloy.pipeline.report import run_report

    return run_report
