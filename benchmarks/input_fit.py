"""New-site images by their geometry: a pipeline run's models on each dataset's held-out images
predicted as a new site would be (a folder of PNGs, no dataset named), against naming the dataset.

    python -m benchmarks.input_fit --run runs/chest [--out benchmarks/results/pipeline-chest-xray]

For each dataset of the run with a held-out share, and each task it labels, the rows are:
the universal model through ``--task T`` (the preprocessing chosen from the images' geometry), through
``--dataset D`` (the reference), through ``--task T --dataset OTHER`` resampled to OTHER's size and at
the images' own size (``--native-size``); and each other dataset's expert, resampled and native.
Writes ``input-fit.json`` (the numbers, with a manifest) and ``input-fit.md`` (the table rendered from it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(pred, truth).sum() / total)


def _held_out(run: Path, name: str) -> tuple[Path, list[str], dict[str, int]]:
    from medalloy.data.dataset import RawDataset
    from medalloy.pipeline.config import load_pipeline
    from medalloy.pipeline.datasets import resolve_datasets

    cfg = load_pipeline(run / "pipeline.yaml")  # the run's resolved copy: absolute paths
    resolved = resolve_datasets(cfg.datasets, run / "data", build=False, progress=False, held_out=cfg.held_out)[name]
    split = resolved.split()
    if split is None:
        raise SystemExit(f"{name} holds its own test cases; this benchmark scores drawn held-out shares")
    ds = RawDataset(resolved.path)
    return resolved.path, split["test"], {k: v for k, v in ds.spec.labels.items() if v}


def _folder(ds_path: Path, ids: list[str], where: Path) -> Path:
    from medalloy.data.dataset import RawDataset

    ds = RawDataset(ds_path)
    where.mkdir(parents=True)
    for cid in ids:
        for f in ds.case(cid).images:
            (where / f.name).symlink_to(f.resolve())
    return where


def score(run: Path, datasets: list[str]) -> list[dict[str, Any]]:
    from medalloy.data.dataset import RawDataset
    from medalloy.data.io import read_label
    from medalloy.predict import predict_folder, predict_tasks

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in datasets:
            ds_path, ids, labels = _held_out(run, name)
            ds = RawDataset(ds_path)
            truth = {cid: read_label(ds.case(cid).label)[0] for cid in ids}
            images = _folder(ds_path, ids, Path(tmp) / name / "images")
            others = [d for d in datasets if d != name]

            def add(model: str, how: str, out: Path, task: str, value: int | None, note: str = "", ids=ids, truth=truth, labels=labels, name=name) -> None:
                dice = []
                for cid in ids:
                    found = next(out.glob(f"{cid}.*"))
                    pred = read_label(found)[0]
                    dice.append(_dice(pred == (value if value is not None else 1), truth[cid] == labels[task]))
                rows.append(
                    {"dataset": name, "task": task, "model": model, "how": how, "dice": round(float(np.mean(dice)), 4), "cases": len(ids), "note": note}
                )

            for task, value in labels.items():
                base = Path(tmp) / name / task
                ways = [("--task (chosen from the images)", {}, False)]
                ways += [(f"--task --dataset {o} (resampled)", {"dataset": o}, False) for o in others]
                ways += [(f"--task --dataset {o} --native-size", {"dataset": o}, True) for o in others]
                for i, (how, kw, native) in enumerate(ways):
                    out = base / f"u{i}"
                    _, note = predict_tasks(run / "universal", images, out, [task], progress=False, native_size=native, **kw)
                    add("universal", how, out / task, task, None, note)
                out = base / "ds"
                predict_folder(run / "universal", images, out, dataset=name, progress=False)
                add("universal", f"--dataset {name} (reference)", out, task, value)
                for other in others:
                    expert = run / "experts" / other
                    other_labels = RawDataset(_held_out(run, other)[0]).spec.labels
                    if task not in other_labels:
                        continue
                    for how, native in (("resampled", False), ("--native-size", True)):
                        out = base / f"{other}-{native}"
                        said: list[str] = []
                        predict_folder(expert, images, out, progress=False, native_size=native, say=said.append)
                        add(f"experts/{other}", how, out, task, other_labels[task], "; ".join(said))
    return rows


def machine() -> str:
    from medalloy.engine.machine import cpu_model

    return f"{os.cpu_count()} CPU cores, {cpu_model()}"


def render(result: dict[str, Any]) -> str:
    m = result["manifest"]
    lines = [
        "# New-site images by their geometry",
        "",
        f"`{m['command']}` on {m['date']}, commit {m['commit']}, medalloy {m['version']}, {m['machine']}.",
        f"Models: the pipeline run `{m['run']}`; cases: each dataset's held-out share (never trained or selected on).",
        "",
        "| dataset | task | model | predicted as | Dice |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['dataset']} | {r['task']} | {r['model']} | {r['how']} | {r['dice']:.3f} |" for r in result["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import medalloy

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a finished pipeline run of examples/chest-xray.yaml (experts and universal stages)")
    p.add_argument("--datasets", nargs="+", default=["JSRT", "Shenzhen"], help="the run's datasets to score (default: JSRT Shenzhen)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/pipeline-chest-xray"), help="folder for input-fit.json and input-fit.md")
    a = p.parse_args(argv)
    rows = score(a.run, a.datasets)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    manifest = {
        "command": f"python -m benchmarks.input_fit --run {a.run} --datasets {' '.join(a.datasets)}",
        "run": str(a.run), "commit": commit, "version": medalloy.__version__, "date": date.today().isoformat(),
        "machine": machine(),
    }  # fmt: skip
    result = {"manifest": manifest, "rows": rows}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "input-fit.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (a.out / "input-fit.md").write_text(render(result), encoding="utf-8")
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
