"""Run a study's arms from their configs and write each arm's manifest.

    python -m benchmarks.run STUDY [--only ARM ...] [--seed N ...] [--var NAME=VALUE ...] [--list] [--dry-run]

A study is a folder ``benchmarks/configs/<study>/``; each ``<arm>.yaml`` in it is one arm (a
``_<name>.yaml`` is a table the study's script reads, not an arm):

- a pipeline YAML (it has ``stages:``): run with ``medalloy.pipeline.run`` into
  ``<work>/<study>/<arm>/`` (a rerun reuses its finished stages); its ``report.json``,
  ``report.md`` and resolved ``pipeline.yaml`` are copied to ``benchmarks/results/<study>/<arm>/``;
- a study's own config (``script: <benchmark module>``, ``args: [...]``): ``python -m
  benchmarks.<script> ARGS`` from the repository root; the script writes its results into
  ``benchmarks/results/<study>/`` as always.

Every arm gets ``benchmarks/results/<study>/manifests/<arm>.json`` (:mod:`benchmarks.manifest`).
``${VAR}`` in a config is replaced by ``--var VAR=...``, then the environment; ``DATA`` defaults to
``$MEDALLOY_SHARED_DATA``, else ``../shared/data`` beside the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks import manifest
from medalloy.errors import MedalloyError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIGS = HERE / "configs"
RESULTS = HERE / "results"
WORK = ROOT / "runs" / "bench"


class ArmError(Exception):
    """A config that cannot run: the message names the file and the fix."""


def arms(study: str, configs: Path = CONFIGS) -> dict[str, Path]:
    """The study's arms by name, in file order."""
    folder = configs / study
    if not folder.is_dir():
        known = ", ".join(sorted(p.name for p in configs.iterdir() if p.is_dir())) if configs.is_dir() else "none"
        raise ArmError(f"{folder}: no such study (studies: {known}); give one of them")
    found = {p.stem: p for p in sorted(folder.glob("*.yaml")) if not p.name.startswith("_")}  # _*.yaml: a study's own tables
    if not found:
        raise ArmError(f"{folder}: no arm configs (*.yaml); add one")
    return found


def read_arm(path: Path) -> dict[str, Any]:
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ArmError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix its syntax") from None
    if not isinstance(cfg, dict) or not ("stages" in cfg or "script" in cfg):
        raise ArmError(f"{path}: an arm is a pipeline (with stages:) or a study config (with script: and args:); add one of them")
    if "script" in cfg:
        unknown = set(cfg) - {"script", "args", "description"}
        if unknown:
            raise ArmError(f"{path}: unknown keys {sorted(unknown)}; a study config has script, args and description")
        if not (HERE / f"{cfg['script']}.py").is_file():
            raise ArmError(f"{path}: script '{cfg['script']}' is not a module of benchmarks/; name one (e.g. experts)")
    return cfg


def _expand(text: str, variables: dict[str, str], path: Path) -> str:
    def one(m: re.Match[str]) -> str:
        if m.group(1) not in variables:
            raise ArmError(f"{path}: ${{{m.group(1)}}} has no value; pass --var {m.group(1)}=...")
        return variables[m.group(1)]

    return re.sub(r"\$\{(\w+)\}", one, text)


def _call(cmd: list[str]) -> int:
    return subprocess.run(cmd, cwd=ROOT, check=False).returncode


def _pipeline_steps_minutes(out: Path) -> tuple[dict[str, int], dict[str, float]]:
    state = json.loads((out / "pipeline.json").read_text(encoding="utf-8"))
    steps = {m["name"]: m["steps"] for s in state["stages"].values() for m in s.get("models", []) if m.get("steps") is not None}
    minutes = {name: round(s.get("seconds", 0.0) / 60, 2) for name, s in state["stages"].items()}
    return steps, minutes


def _with_seed(args: list[str], seed: int, results: Path, path: Path) -> list[str]:
    """A study config's command line at another seed, its results apart (scripts refuse to merge seeds)."""
    if "--seed" not in args:
        raise ArmError(f"{path}: its script takes no --seed in args; add `--seed, '0'` to args to run it at other seeds")
    out = list(args)
    out[out.index("--seed") + 1] = str(seed)
    if "--results" in out:
        out[out.index("--results") + 1] = str(results)
    else:
        out += ["--results", str(results)]
    return out


def run_arm(
    study: str, arm: str, path: Path, variables: dict[str, str], results: Path, work: Path, progress: bool = True, seed: int | None = None
) -> dict[str, Any]:
    """Run one arm (at ``seed``, else its config's) and write its manifest; returns the manifest. An
    arm at another seed is its own arm: ``<arm>-seed<N>``, with its own results and run folder."""
    cfg = read_arm(path)
    name = arm if seed is None else f"{arm}-seed{seed}"
    start = time.perf_counter()
    if "stages" in cfg:
        from medalloy.pipeline import load_pipeline
        from medalloy.pipeline import run as run_pipeline

        out = work / study / name
        pipeline = load_pipeline(path, variables)
        if seed is not None:
            pipeline.seed = seed
        run_pipeline(pipeline, out, progress=progress)
        dest = results / study / name
        dest.mkdir(parents=True, exist_ok=True)
        for file in ("report.json", "report.md", "pipeline.yaml"):
            if (out / file).is_file():
                shutil.copyfile(out / file, dest / file)
        steps, stage_minutes = _pipeline_steps_minutes(out)
        command = f"python -m benchmarks.run {study} --only {arm}" + (f" --seed {seed}" if seed is not None else "")
        extra: dict[str, Any] = {"stage_minutes": stage_minutes, "run_folder": str(out), "results": dest.relative_to(results).as_posix()}
        minutes = sum(stage_minutes.values())
    else:
        args = [_expand(str(a), variables, path) for a in cfg.get("args") or []]
        if seed is not None:
            args = _with_seed(args, seed, results / study / f"seed{seed}", path)
        cmd = [sys.executable, "-m", f"benchmarks.{cfg['script']}", *args]
        if _call(cmd) != 0:
            raise ArmError(f"{path}: `python -m benchmarks.{cfg['script']} {' '.join(args)}` failed (its output is above); fix it and rerun this arm")
        steps, command, extra = None, f"python -m benchmarks.{cfg['script']} {' '.join(args)}".strip(), {}
        minutes = (time.perf_counter() - start) / 60
    extra["wall_minutes"] = round((time.perf_counter() - start) / 60, 2)
    tables = sorted(path.parent.glob("_*.yaml"))  # what the study's script reads beside the arm (distill's models)
    if tables:
        extra["tables"] = {t.name: manifest.config_sha256(t) for t in tables}
    record = manifest.build(study, name, path, command, minutes, steps, variables, **extra)
    manifest.write(results / study / "manifests" / f"{name}.json", record)
    return record


def _variables(given: list[str]) -> dict[str, str]:
    out = {"DATA": os.environ.get("MEDALLOY_SHARED_DATA", str(ROOT.parent / "shared" / "data"))}
    for item in given:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ArmError(f"--var {item}: write NAME=VALUE")
        out[name] = value
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="a folder of benchmarks/configs/")
    p.add_argument("--only", nargs="+", metavar="ARM", help="run these arms (default: every arm of the study)")
    p.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="a ${NAME} in the configs (DATA: the shared data, default ../shared/data)")
    p.add_argument(
        "--seed", type=int, nargs="+", metavar="N", help="run each arm at these seeds (arm-seedN: its own results and manifest; default: the config's seed)"
    )
    p.add_argument("--list", action="store_true", help="list the study's arms and what each runs, and stop")
    p.add_argument("--dry-run", action="store_true", help="say what would run, run nothing")
    p.add_argument("--configs", type=Path, default=CONFIGS, help="where the studies' configs are (default benchmarks/configs)")
    p.add_argument("--results", type=Path, default=RESULTS, help="where results and manifests go (default benchmarks/results)")
    p.add_argument("--work", type=Path, default=WORK, help="run folders of pipeline arms (default runs/bench)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    try:
        found = arms(a.study, a.configs)
        chosen = a.only or list(found)
        missing = [n for n in chosen if n not in found]
        if missing:
            raise ArmError(f"{a.configs / a.study}: no arm {', '.join(missing)} (arms: {', '.join(found)}); name one of them")
        variables = _variables(a.var)
        for name in chosen:
            cfg = read_arm(found[name])
            what = "pipeline" if "stages" in cfg else f"python -m benchmarks.{cfg['script']} {' '.join(map(str, cfg.get('args') or []))}"
            if a.list or a.dry_run:
                print(f"{name}: {what}" + (f"  ({cfg['description']})" if cfg.get("description") else ""))
                continue
            for seed in a.seed or [None]:
                print(f"[bench] {a.study}/{name}{'' if seed is None else f' seed {seed}'}: {what}", flush=True)
                record = run_arm(a.study, name, found[name], variables, a.results, a.work, progress=not a.quiet, seed=seed)
                print(
                    f"[bench] {a.study}/{record['arm']}: {record['minutes']:.1f} min; manifest {a.results / a.study / 'manifests' / (record['arm'] + '.json')}",
                    flush=True,
                )
    except (ArmError, MedalloyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
