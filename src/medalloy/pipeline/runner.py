"""``medalloy pipeline``: run a pipeline's stages in order into one folder, reusing what finished.

``RUN/pipeline.json`` holds each stage's key, status and record, rewritten atomically after every
change, so a run killed at any moment and started again with the same command reuses the stages
that finished (their key unchanged), resumes the one it was in, and ends as an uninterrupted one.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from medalloy import __version__
from medalloy.engine.distributed import DistInfo, broadcast_object, from_main, init_distributed, resolve_device, world_from_env
from medalloy.errors import MedalloyError
from medalloy.jsonio import read_json, write_json_atomic, write_text_atomic
from medalloy.pipeline.config import DistillStage, PipelineConfig, load_pipeline
from medalloy.pipeline.datasets import ResolvedDataset, check_datasets, resolve_datasets
from medalloy.pipeline.graph import StagePlan, describe_inputs, input_summary, plan_stages, select, what_changed
from medalloy.pipeline.stages import TRAINING_KINDS, Context, runner_for

STATE_FILE = "pipeline.json"


@dataclass
class PipelineResult:
    out: Path
    stages: dict[str, dict[str, Any]]  # name -> record (key, status, models, ...)
    plan: list[dict[str, Any]]  # the resolved plan, as the dry run prints it

    @property
    def report(self) -> Path | None:
        path = self.out / "report.md"
        return path if path.is_file() else None


def _open(out: Path, dry_run: bool) -> dict[str, Any]:
    """The folder's state (a new one for a new folder); a non-empty folder that is not a pipeline's is refused."""
    state_file = out / STATE_FILE
    if state_file.is_file():
        state = read_json(state_file, STATE_FILE, "delete the run folder (or choose another --out) to start afresh")
        if not isinstance(state, dict) or not isinstance(state.get("stages"), dict):
            raise MedalloyError(f"{STATE_FILE} is not a pipeline's state", state_file, "choose another --out")
        return state
    if out.exists() and any(out.iterdir()):
        raise MedalloyError(f"folder is not empty and holds no {STATE_FILE}", out, "choose a new or empty --out folder")
    state = {"version": __version__, "stages": {}, "checked": {}}
    if not dry_run:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(state_file, state)
    return state


def _status(p: StagePlan, state: dict[str, Any], root: Path) -> tuple[str, str]:
    """(status, why): reuse a finished stage with the same key, resume one with the same key, else run."""
    rec = state["stages"].get(p.name)
    if rec is None:
        return "run", ""
    if rec.get("key") != p.key:
        return "run", what_changed(rec.get("inputs") or {}, p)
    if rec.get("status") == "done":
        outputs = [m["path"] for m in rec.get("models", [])] + [rec[k] for k in ("results", "report") if isinstance(rec.get(k), str)]
        missing = [o for o in outputs if not (root / o).exists()]
        return ("run", f"its output {missing[0]} is missing") if missing else ("reuse", "")
    return "resume", ""


def plan_table(order: list[StagePlan], state: dict[str, Any], root: Path, chosen: set[str]) -> list[dict[str, Any]]:
    keys = {p.name: p.key for p in order}
    rows: list[dict[str, Any]] = []
    again: set[str] = set()  # stages that run again: what reads them has read outputs that go
    for p in order:
        status, why = _status(p, state, root)
        redone = [n for n in p.needs if n in again]
        if status == "reuse" and redone:
            status, why = "run", f"it reads {redone[0]}, which runs again"
        if status != "reuse" and p.name in state["stages"]:
            again.add(p.name)
        if p.name not in chosen and status != "reuse":
            status = "skip"
        rows.append(
            {
                "stage": p.name,
                "kind": p.kind,
                "key": p.key[:8],
                "status": status,
                "why": why,
                "budget": "-" if p.budget is None else f"{p.budget:.1f}m",
                "inputs": describe_inputs(p, keys),
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    cols = ("stage", "key", "status", "budget", "inputs")
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(width[c]) for c in cols)]
    for r in rows:
        line = "  ".join(str(r[c]).ljust(width[c]) for c in cols)
        lines.append(line + (f"  ({r['why']})" if r["why"] else ""))
    return "\n".join(line.rstrip() for line in lines)


def _world(cfg: PipelineConfig, dry_run: bool) -> DistInfo:
    """The process group torchrun describes (a single process outside torchrun, and for a dry run)."""
    if dry_run or world_from_env()[0] <= 1:
        return DistInfo()
    return init_distributed(resolve_device(cfg.device))


def _check_static(order: list[StagePlan], datasets: dict[str, ResolvedDataset], info: DistInfo | None = None) -> None:
    """Refusals that need no training: a student's datasets its teacher stage never learned;
    under torchrun, leave-one-source-out (it retrains inside evaluate, which runs on rank 0)."""
    by_name = {p.name: p for p in order}
    if info is not None and info.enabled:
        loso = [p.name for p in order if getattr(p.stage, "leave_one_source_out", False)]
        if loso:
            raise MedalloyError(
                f"stage '{loso[0]}': leave_one_source_out retrains inside evaluate, which runs on rank 0 alone", fix="run that pipeline without torchrun"
            )
    for p in order:
        if isinstance(p.stage, DistillStage) and p.stage.teacher in by_name:
            missing = [d for d in p.datasets if d not in by_name[p.stage.teacher].datasets]
            if missing:
                raise MedalloyError(
                    f"stage '{p.name}': teacher '{p.stage.teacher}' does not learn {', '.join(missing)}, so it cannot teach those tasks",
                    fix=f"give '{p.name}' datasets: [{', '.join(by_name[p.stage.teacher].datasets)}] (or a subset)",
                )


def run(
    config: str | Path | dict | PipelineConfig,
    out: str | Path,
    until: str | None = None,
    only: list[str] | None = None,
    dry_run: bool = False,
    progress: bool = True,
    variables: dict[str, str] | None = None,
    log: bool | None = None,
) -> PipelineResult:
    """Run the pipeline ``config`` (a YAML path, a dict or a :class:`PipelineConfig`) into ``out``.

    ``until``: stop after that stage; ``only``: run just these stages (the stages they read must
    have finished); ``dry_run``: print the resolved plan (what runs, what is reused, budgets,
    inputs) and write nothing. ``progress``: the bars inside the stages; ``log`` (default: as
    ``progress``): one line per stage start and end."""
    log = progress if log is None else log
    cfg = load_pipeline(config, variables)
    root = Path(out)
    info = _world(cfg, dry_run)
    # under torchrun rank 0 reads and writes the folder, and every rank follows what it found
    state = from_main(lambda: _open(root, dry_run), info)
    datasets = from_main(lambda: resolve_datasets(cfg.datasets, root / "data", build=not dry_run, progress=progress, held_out=cfg.held_out), info)
    order = plan_stages(cfg, datasets)
    chosen = select(order, until, only)
    from_main(lambda: _check_static(order, datasets, info), info)
    rows = plan_table(order, state, root, chosen)
    say = _printer(log and info.is_main)
    if dry_run:
        print(format_table(rows), flush=True)
        return PipelineResult(root, dict(state["stages"]), rows)

    def start() -> dict[str, Any]:
        write_text_atomic(root / "pipeline.yaml", _yaml(cfg))
        check_datasets(datasets, state["checked"])
        write_json_atomic(root / STATE_FILE, state)
        return state

    state = from_main(start, info)
    ctx = Context(root, cfg, datasets, {}, progress and info.is_main, log and info.is_main)
    t_all = time.perf_counter()
    for p, row in zip(order, rows):
        status = row["status"]
        if status == "reuse":
            ctx.records[p.name] = state["stages"][p.name]
            say(f"{p.name}: reused (key {p.key[:8]}, finished {state['stages'][p.name].get('finished', '?')})")
            continue
        if p.name not in chosen:
            continue
        missing = [n for n in p.needs if n not in ctx.records]
        if missing:
            raise MedalloyError(
                f"stage '{p.name}' reads '{missing[0]}', which has not finished", root, f"run without --only/--until, or add --only {missing[0]}"
            )

        def begin(p: StagePlan = p, status: str = status, why: str = row["why"]) -> None:
            if status == "run" and (root / p.name).exists():
                if p.name in state["stages"]:
                    say(f"{p.name}: {why or 'started again'}: its earlier output goes")
                shutil.rmtree(root / p.name)
            write_json_atomic(root / STATE_FILE, state)

        state["stages"][p.name] = {"kind": p.kind, "key": p.key, "status": "running", "inputs": input_summary(p)}
        from_main(begin, info)
        say(f"{p.name}: {'resumed' if status == 'resume' else 'started'}" + (f" (budget {p.budget:.1f} min)" if p.budget else ""))
        t0 = time.perf_counter()
        if p.kind in TRAINING_KINDS:  # every rank trains (data-parallel); rank 0's record is the stage's
            record = broadcast_object(runner_for(p.kind)(ctx, p), info)
        else:
            record = from_main(lambda p=p: runner_for(p.kind)(ctx, p), info)
        seconds = broadcast_object(time.perf_counter() - t0, info)
        state["stages"][p.name] = {
            **state["stages"][p.name],
            **record,
            "status": "done",
            "seconds": round(seconds, 1),
            "finished": broadcast_object(_now(), info),
        }
        ctx.records[p.name] = state["stages"][p.name]
        from_main(lambda: write_json_atomic(root / STATE_FILE, state), info)
        note = record.get("note")
        say(f"{p.name}: done in {_minutes(seconds)}" + (f", {note}" if note else ""))
    say(f"finished in {_minutes(time.perf_counter() - t_all)}" + (f": {root / 'report.md'}" if (root / "report.md").is_file() else ""))
    return PipelineResult(root, dict(state["stages"]), rows)


def _printer(progress: bool):
    def say(msg: str) -> None:
        if progress:
            tqdm.write(f"[medalloy pipeline] {msg}", file=sys.stdout)

    return say


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _yaml(cfg: PipelineConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=False)
