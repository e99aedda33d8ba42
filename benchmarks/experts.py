"""Experts on the real datasets of ../shared/data within a fixed CPU budget per expert.

    python -m benchmarks.experts [--data ../shared/data] [--budget-minutes 10] [--only JSRT ...]

Every expert is trained with medalloy's defaults (planner + expert recipe) for a wall-clock budget,
then evaluated on held-out cases it never saw, neither in training nor in model selection:
fold 0 of a 5-fold split (by patient when known) is the test set, and a tenth of the remaining
cases (at most 16) validates; ACDC uses its `splits_patients.json` (train / val / test patients).
Cross-source rows apply an expert to another source's held-out cases (labels they share only).

Writes `benchmarks/results/experts/results.json` and `results.md` (people's notes on the results are in
NOTES.md beside them, which this script never writes); `--only NAME` runs some experts and merges
their rows (and the cross rows they make possible) into the existing results.

`--with-nnunet` also runs nnU-Net v2 (2d, `-device cpu`, its own commands in its own venv, see
benchmarks/README.md and nnunet_peer.py) on each expert's split within the same budget, stored as the
row's "nnunet" entry and shown beside medalloy's columns; `--nnunet-only` keeps the medalloy rows
already in results.json and runs just the peer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import EXPERTS, PLAN_OPTIONS, copy_ground_truth, dataset_path, evaluate, splits, timed_prediction

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "experts"
DEFAULT_DATA = Path(os.environ.get("MEDALLOY_SHARED_DATA", HERE.parent.parent / "shared" / "data"))
# Experts of a dataset above under other planner settings: name -> (dataset's expert name, planner options).
# The planner's crop option trades context for speed; these rows, with their cross rows, measure what it costs.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "JSRT-crop128": ("JSRT", {"max_2d_patch": 128}),
    "Shenzhen-crop128": ("Shenzhen", {"max_2d_patch": 128}),
}
# (trained expert, test set of): evaluated on the labels both share
CROSS = [
    ("Polyp-Kvasir", "Polyp-CVC"), ("Polyp-CVC", "Polyp-Kvasir"), ("JSRT", "Shenzhen"), ("Shenzhen", "JSRT"),
    ("JSRT-crop128", "Shenzhen"), ("Shenzhen-crop128", "JSRT"),
]  # fmt: skip
NOTES_LINE = "Notes (written by people, not generated): [NOTES.md](NOTES.md)."
TARGETS = {
    "JSRT": {"lung": 0.95, "heart": 0.90},
    "Shenzhen": {"lung": 0.92},
    "Polyp-Kvasir": {"polyp": 0.75},
    "ACDC": {"mean": 0.85},
    "Hippocampus": {"mean": 0.85},
}


def log(msg: str) -> None:
    print(f"[experts] {msg}", flush=True)


def dataset_of(name: str) -> str:
    """The expert name whose dataset and held-out split a row uses (a variant's base; itself otherwise)."""
    return VARIANTS[name][0] if name in VARIANTS else name


def plan_options(name: str) -> dict[str, Any]:
    return VARIANTS[name][1] if name in VARIANTS else PLAN_OPTIONS.get(name, {})


def run_expert(name: str, data: Path, work: Path, budget: float, seed: int) -> dict[str, Any]:
    from medalloy.data.dataset import RawDataset
    from medalloy.recipes.expert import train_expert

    ds_path = dataset_path(dataset_of(name), data, work)
    ds = RawDataset(ds_path)
    split = splits(dataset_of(name), ds_path, seed)
    log(f"{name}: {len(split['train'])} train / {len(split['val'])} val / {len(split['test'])} test cases, budget {budget} min")
    run = work / "runs" / name
    plan = None
    if plan_options(name):
        from medalloy.planning.fingerprint import fingerprint
        from medalloy.planning.planner import plan_dataset

        plan = plan_dataset(ds, fingerprint(ds, progress=False), **plan_options(name))
    res = train_expert(
        ds_path,
        run,
        plan=plan,
        split={"train": split["train"], "val": split["val"]},
        overwrite=True,
        progress=sys.stderr.isatty(),
        steps=1_000_000,
        time_budget_minutes=budget,
        val_every=200,
        seed=seed,
    )
    labels = ds.spec.labels
    fg = {k: v for k, v in labels.items() if v != 0}
    pred, gt = work / "pred" / name, work / "gt" / name
    for d in (pred, gt):
        shutil.rmtree(d, ignore_errors=True)
    sec_per_case = timed_prediction(run, ds_path, split["test"], pred)
    copy_ground_truth(ds_path, split["test"], gt, labels)
    row = evaluate(pred, gt, labels, work / "eval" / name)
    row.update(
        {
            "train_minutes": round(res["seconds"] / 60, 2),
            "images_per_second": round(res["images_per_s"], 2),
            "params": int(res["params"]),
            "source": "in",
            "steps": int(res["steps"]),
            "test_cases": len(split["test"]),
            "inference_seconds_per_case": round(sec_per_case, 3),
            "mean_dice": round(float(np.mean([row[k]["dice"] for k in fg])), 4),
            "patch_size": json.loads((run / "plan.json").read_text(encoding="utf-8"))["patch_size"],
            "plan_options": plan_options(name),
        }
    )
    log(f"{name}: " + ", ".join(f"{k} {row[k]['dice']:.3f}" for k in fg) + f" in {row['train_minutes']} min ({row['steps']} steps)")
    return row


def run_cross(train_name: str, test_name: str, data: Path, work: Path, seed: int, rows: dict[str, Any]) -> dict[str, Any]:
    from medalloy.data.dataset import RawDataset

    run = work / "runs" / train_name
    test_path = dataset_path(test_name, data, work)
    train_labels = RawDataset(dataset_path(dataset_of(train_name), data, work)).spec.labels
    test_labels = RawDataset(test_path).spec.labels
    shared = {k: v for k, v in test_labels.items() if train_labels.get(k) == v}
    test_ids = splits(test_name, test_path, seed)["test"]
    key = f"{train_name}->{test_name}"
    pred, gt = work / "pred" / key, work / "gt" / key
    for d in (pred, gt):
        shutil.rmtree(d, ignore_errors=True)
    sec = timed_prediction(run, test_path, test_ids, pred, keep=list(shared))
    copy_ground_truth(test_path, test_ids, gt, shared)
    row = evaluate(pred, gt, shared, work / "eval" / key)
    src = lambda n: n.removeprefix("Polyp-")  # noqa: E731  (Polyp-Kvasir -> Kvasir; JSRT-crop128 stays)
    base = rows.get(train_name, {})
    row.update(
        {
            "train_minutes": base.get("train_minutes"),
            "images_per_second": base.get("images_per_second"),
            "params": base.get("params"),
            "source": f"cross:{src(train_name)}->{src(test_name)}",
            "test_cases": len(test_ids),
            "inference_seconds_per_case": round(sec, 3),
            "mean_dice": round(float(np.mean([row[k]["dice"] for k in shared if shared[k] != 0])), 4),
        }
    )
    log(f"{key}: " + ", ".join(f"{k} {row[k]['dice']:.3f}" for k in shared if shared[k] != 0))
    return row


def _peer_cells(row: dict[str, Any], label: str) -> str:
    """nnU-Net's four cells for one table line of ``row`` (blank when the row has no nnU-Net entry)."""
    peer = row.get("nnunet")
    if not isinstance(peer, dict):
        return " | | | |"
    if "error" in peer:
        return " failed | | | |"
    if label == "mean":
        return f" {peer['mean_dice']:.3f} | | | |"
    if label not in peer:
        return " | | | |"
    return f" {peer[label]['dice']:.3f} | {peer[label]['hd95']:.2f} | {peer.get('train_minutes', '')} | {peer.get('iterations', '')} |"


def _peer_summary(rows: dict[str, Any]) -> list[str]:
    """Mean Dice of medalloy against nnU-Net's, per expert that has both."""
    lines = []
    for name, row in rows.items():
        peer = row.get("nnunet")
        if isinstance(peer, dict) and "mean_dice" in peer and "mean_dice" in row:
            diff = row["mean_dice"] - peer["mean_dice"]
            lines.append(
                f"- {name}: medalloy {row['mean_dice']:.3f} vs nnU-Net {peer['mean_dice']:.3f} ({diff:+.3f}); "
                f"nnU-Net {peer['epochs']} epochs x {peer['iterations_per_epoch']} iterations, batch {peer['batch_size']}, "
                f"patch {'x'.join(str(s) for s in peer['patch_size'])}, {peer['images_per_second']} images/s"
            )
        elif isinstance(peer, dict) and "error" in peer:
            lines.append(f"- {name}: nnU-Net failed: {peer['error']}")
    return lines


def markdown(rows: dict[str, Any], budget: float) -> str:
    with_peer = any(isinstance(r.get("nnunet"), dict) for r in rows.values())
    peer = _peer_cells if with_peer else (lambda row, label: "")
    lines = [
        "# Experts on real data",
        "",
        f"medalloy defaults (planner + expert recipe, bf16 on CPU), {budget:g} min wall-clock budget per expert on 2 CPU cores; "
        "held-out test cases never used for training or model selection (fold 0 of 5, by patient when known; ACDC: its "
        "patient split). Cross rows apply an expert to another source's held-out cases, on the labels both share. "
        "images/s = training throughput. Produced by `python -m benchmarks.experts`.",
        "",
        "Planner settings other than the defaults: "
        + (
            "; ".join(
                f"{n}: {', '.join(f'{k}={v}' for k, v in r['plan_options'].items())}"
                for n, r in rows.items()
                if r.get("source") == "in" and r.get("plan_options")
            )
            or "none"
        )
        + ".",
        "",
        "| expert | source | label | Dice | HD95 | target | train min | steps | images/s | params |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    if with_peer:
        lines[3:3] = [
            "",
            "nnU-Net columns: nnU-Net v2 (2d configuration for every dataset, `-device cpu`, its own commands and defaults) "
            "trained on the same train/val cases within the same budget: a short calibration run fixes epochs x "
            "iterations per epoch (trainer `nnUNetTrainerBudget`, otherwise nnU-Net's default trainer), prediction with "
            "nnU-Net's default test-time mirroring, scored by the same code on the same test cases. nnU-Net iterations "
            "are batches of its own batch size. Produced by `python -m benchmarks.experts --with-nnunet`.",
        ]
        lines[-2] += " nnU-Net Dice | nnU-Net HD95 | nnU-Net train min | nnU-Net iterations |"
        lines[-1] += "---|---|---|---|"
    missed = []
    for name, row in rows.items():
        labels = [k for k, v in row.items() if isinstance(v, dict) and "dice" in v]
        for label in labels:
            target = TARGETS.get(name, {}).get(label) if row["source"] == "in" else None
            lines.append(
                f"| {name} | {row['source']} | {label} | {row[label]['dice']:.3f} | {row[label]['hd95']:.2f} | "
                f"{'' if target is None else f'>= {target:.2f}'} | {row.get('train_minutes') or ''} | {row.get('steps', '')} | "
                f"{row.get('images_per_second') or ''} | {row.get('params') or ''} |" + peer(row, label)
            )
            if target is not None and row[label]["dice"] < target:
                missed.append(f"{name} {label}: {row[label]['dice']:.3f} < {target}")
        mean_target = TARGETS.get(name, {}).get("mean") if row["source"] == "in" else None
        if mean_target is not None:
            lines.append(f"| {name} | in | mean | {row['mean_dice']:.3f} | | >= {mean_target:.2f} | | | | |" + peer(row, "mean"))
            if row["mean_dice"] < mean_target:
                missed.append(f"{name} mean: {row['mean_dice']:.3f} < {mean_target}")
    lines += ["", "## Targets", ""]
    lines += [f"- missed: {m}" for m in missed] or ["- all targets of the rows above are met"]
    if with_peer:
        lines += ["", "## medalloy vs nnU-Net (mean foreground Dice)", ""] + (_peer_summary(rows) or ["- no expert has both rows"])
        no_peer = [n for n, r in rows.items() if r.get("source") == "in" and n in EXPERTS and not isinstance(r.get("nnunet"), dict)]
        if no_peer:
            lines.append(f"- not measured yet: {', '.join(no_peer)} (`python -m benchmarks.experts --nnunet-only --only NAME` adds a row)")
    lines += ["", NOTES_LINE]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--work", type=Path, default=HERE.parent / "runs" / "bench-experts")
    p.add_argument("--budget-minutes", type=float, default=10.0)
    p.add_argument("--only", nargs="*", choices=[*EXPERTS, *VARIANTS], default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--with-nnunet", action="store_true", help="also run nnU-Net v2 (2d, CPU) on each expert's split and budget")
    p.add_argument("--nnunet-only", action="store_true", help="keep the medalloy rows of results.json; run only nnU-Net")
    p.add_argument("--nnunet-venv", type=Path, default=Path(os.environ.get("MEDALLOY_NNUNET_VENV", HERE.parent / "runs" / "nnunet-venv")))
    a = p.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    if not a.data.is_dir():
        print(f"experts.py: data folder {a.data} not found; pass --data", file=sys.stderr)
        return 1
    a.results.mkdir(parents=True, exist_ok=True)
    out_json = a.results / "results.json"
    rows: dict[str, Any] = json.loads(out_json.read_text(encoding="utf-8")) if out_json.exists() else {}
    names = a.only or [*EXPERTS, *VARIANTS]
    if a.with_nnunet or a.nnunet_only:
        from benchmarks.nnunet_peer import check_venv
        from medalloy.errors import MedalloyError

        try:
            check_venv(a.nnunet_venv)  # fail before hours of medalloy training, not after
        except MedalloyError as exc:
            print(f"experts.py: {exc}", file=sys.stderr)
            return 1
        missing = [n for n in names if n not in rows and n in EXPERTS]
        if a.nnunet_only and missing:
            print(f"experts.py: {out_json} has no medalloy row for {', '.join(missing)}; run without --nnunet-only first", file=sys.stderr)
            return 1
    for name in names:
        if not a.nnunet_only:
            earlier = rows.get(name, {}).get("nnunet")
            rows[name] = run_expert(name, a.data, a.work, a.budget_minutes, a.seed)
            if _same_setting(earlier, a.budget_minutes, a.seed):  # keep a matching peer row when the peer is not rerun
                rows[name]["nnunet"] = earlier
            _save(rows, a.results, a.budget_minutes)
        if (a.with_nnunet or a.nnunet_only) and name in EXPERTS:  # the peer runs at nnU-Net's own plan: a variant has none
            rows[name]["nnunet"] = run_peer(name, a.data, a.work, a.budget_minutes, a.seed, a.nnunet_venv, a.threads)
            _save(rows, a.results, a.budget_minutes)
    if a.nnunet_only:
        return 0
    for train_name, test_name in CROSS:
        if (train_name in names or test_name in names) and (a.work / "runs" / train_name / "checkpoints" / "best.safetensors").exists():
            rows[f"{train_name}->{test_name}"] = run_cross(train_name, test_name, a.data, a.work, a.seed, rows)
            _save(rows, a.results, a.budget_minutes)
    return 0


def _same_setting(peer: Any, budget: float, seed: int) -> bool:
    """An nnU-Net entry made with this budget and seed (hence these splits)."""
    return isinstance(peer, dict) and "error" not in peer and peer.get("budget_minutes") == budget and peer.get("seed") == seed


def run_peer(name: str, data: Path, work: Path, budget: float, seed: int, venv: Path, threads: int | None) -> dict[str, Any]:
    """nnU-Net v2 on the expert's split and budget (nnunet_peer.run_nnunet); a failure is recorded, not raised,
    so one dataset nnU-Net cannot handle does not stop the others."""
    import traceback

    from benchmarks.nnunet_peer import run_nnunet

    ds_path = dataset_path(name, data, work)
    try:
        row = run_nnunet(name, ds_path, splits(name, ds_path, seed), budget, work, venv, threads=threads, overwrite=True)
    except Exception as exc:  # noqa: BLE001  (reported in the results and on stderr)
        traceback.print_exc()
        log(f"{name}: nnU-Net failed: {exc}")
        return {"error": str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__, "budget_minutes": budget, "seed": seed}
    row["seed"] = seed
    return row


def _save(rows: dict[str, Any], results: Path, budget: float) -> None:
    order = [*EXPERTS, *VARIANTS] + [f"{a}->{b}" for a, b in CROSS]
    rows = {k: rows[k] for k in order if k in rows}
    for path, text in ((results / "results.json", json.dumps(rows, indent=2) + "\n"), (results / "results.md", markdown(rows, budget))):
        tmp = path.with_name(".tmp-" + path.name)
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
