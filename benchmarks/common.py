"""What the benchmark scripts share: the real datasets, their held-out splits and planner
settings, and scoring (no benchmark imports another benchmark: shared parts live here)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

POLYP = "Dataset201_Polyp"

# The held-out splits every benchmark shares. name -> (dataset folder, source filter or None, how the held-out set is chosen)
EXPERTS: dict[str, tuple[str, str | None, str]] = {
    "JSRT": ("Dataset102_JSRT", None, "kfold"),
    "Shenzhen": ("Dataset103_Shenzhen", None, "kfold"),
    "Polyp-Kvasir": (POLYP, "Kvasir", "kfold"),
    "Polyp-CVC": (POLYP, "CVC", "kfold"),
    "ACDC": ("Dataset104_ACDC", None, "acdc"),
    "Hippocampus": ("Dataset105_Hippocampus", None, "kfold"),
}
# Planner settings that differ from the defaults (experts.py says why; universal.py plans each dataset the same way)
PLAN_OPTIONS: dict[str, dict[str, Any]] = {
    "Polyp-Kvasir": {"max_2d_side": 128},
    "ACDC": {"max_2d_patch": 128},
}


def dataset_path(name: str, data: Path, work: Path) -> Path:
    folder = EXPERTS[name][0]
    if folder == POLYP:
        return ensure_polyp(data, work)
    return data / folder


def ensure_polyp(data: Path, work: Path) -> Path:
    """Kvasir-SEG and CVC-ClinicDB imported into one dataset with two sources (cached in the work dir)."""
    from medalloy.data.dataset import RawDataset
    from medalloy.data.importer import import_folders

    out = work / "data" / POLYP
    if out.exists():
        ds = RawDataset(out)
        if set(ds.sources) == {"Kvasir", "CVC"}:
            return out
        shutil.rmtree(out)
    for source, folder in (("Kvasir", "Kvasir-SEG"), ("CVC", "CVC-ClinicDB")):
        print(f"[data] importing {folder} as source {source}", flush=True)
        import_folders(data / "Polyp" / folder / "images", data / "Polyp" / folder / "masks", out, source=source, labels={"polyp": 1}, modality="endoscopy")
    return out


def splits(name: str, ds_path: Path, seed: int = 0) -> dict[str, list[str]]:
    """{"train", "val", "test"} case ids; test is never used for training or model selection."""
    from medalloy.data.dataset import RawDataset
    from medalloy.data.splits import kfold_splits

    ds = RawDataset(ds_path)
    source, how = EXPERTS[name][1], EXPERTS[name][2]
    cases = [c for c in ds.labelled_cases() if source is None or c.source == source]
    if how == "acdc":
        patients = json.loads((ds_path / "splits_patients.json").read_text(encoding="utf-8"))
        by = {part: {p for p in ids} for part, ids in patients.items()}
        pick = lambda part: [c.case_id for c in cases if c.case_id.split("_")[0] in by[part]]  # noqa: E731
        return {"train": pick("train"), "val": pick("val"), "test": pick("test")}
    fold0 = kfold_splits(cases, k=5, seed=seed)[0]
    test = set(fold0["val"])
    rest = [c for c in cases if c.case_id not in test]
    val = {c.case_id for c in rest[::10][:16]}
    return {"train": [c.case_id for c in rest if c.case_id not in val], "val": sorted(val), "test": sorted(test)}


def timed_prediction(run: Path, ds_path: Path, case_ids: list[str], out: Path, keep: list[str] | None = None, as_dataset: str | None = None) -> float:
    """:func:`medalloy.predict.predict_cases` on ``case_ids`` (labels not in ``keep`` become
    background; ``as_dataset``: a universal model asked as that training dataset); returns seconds per case."""
    from medalloy.predict import predict_cases

    t0 = time.perf_counter()
    predict_cases(run, ds_path, case_ids, out, keep_labels=keep, device="cpu", overwrite=True, progress=False, as_dataset=as_dataset)
    return (time.perf_counter() - t0) / max(1, len(case_ids))


def copy_ground_truth(ds_path: Path, case_ids: list[str], out: Path, keep: dict[str, int]) -> None:
    """Held-out labels, with values outside ``keep`` set to background (for cross-label rows)."""
    from medalloy.data.dataset import RawDataset
    from medalloy.data.io import read_label, write_label

    ds = RawDataset(ds_path)
    out.mkdir(parents=True, exist_ok=True)
    for cid in case_ids:
        label, meta = read_label(ds.case(cid).label)
        label = np.where(np.isin(label, list(keep.values())), label, 0)
        write_label(out / f"{cid}{ds.spec.file_ending}", label, meta)


def evaluate(pred: Path, gt: Path, labels: dict[str, int], out: Path) -> dict[str, Any]:
    from medalloy.evaluation import evaluate_folders

    res = evaluate_folders(pred, gt, labels=labels, out_dir=out, overwrite=True, progress=False)
    row = {}
    for name, stats in res["summary"]["classes"].items():
        row[name] = {"dice": round(stats["dice"]["mean"], 4), "hd95": round(stats["hd95"]["mean"], 3)}
    return row


def predict_and_score(
    run: Path, ds_path: Path, ids: list[str], labels: dict[str, int], key: str, work: Path, as_dataset: str | None = None
) -> tuple[dict[str, Any], float]:
    """Predict ``ids`` of ``ds_path`` with ``run``, keep ``labels``; -> (per-label Dice/HD95, s per case)."""
    pred, gt = work / "pred" / key, work / "gt" / key
    for d in (pred, gt):
        shutil.rmtree(d, ignore_errors=True)
    sec = timed_prediction(run, ds_path, ids, pred, keep=list(labels), as_dataset=as_dataset)
    copy_ground_truth(ds_path, ids, gt, labels)
    return evaluate(pred, gt, labels, work / "eval" / key), sec


def member_folder(name: str, data: Path, work: Path) -> Path:
    """A dataset folder of its own per mix member: a polyp centre becomes a dataset named after it
    (links to the combined import's files, same case ids, so the experts' splits apply)."""
    folder = dataset_path(name, data, work)
    if folder.name != POLYP:
        return folder
    from medalloy.data.dataset import RawDataset

    centre = name.split("-")[1]
    view = work / "data" / f"Dataset21{1 if centre == 'Kvasir' else 2}_Polyp{centre}"
    if (view / "dataset.json").exists():
        return view
    combined = RawDataset(folder)
    raw = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    cases = [c for c in combined.labelled_cases() if c.source == centre]
    tmp = view.with_name(view.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("imagesTr", "labelsTr"):
        (tmp / sub).mkdir(parents=True)
    for c in cases:
        for f in c.images:
            (tmp / "imagesTr" / f.name).symlink_to(f.resolve())
        (tmp / "labelsTr" / c.label.name).symlink_to(c.label.resolve())
    raw["name"], raw["numTraining"] = name, len(cases)
    raw.setdefault("medalloy", {})["cases"] = {c.case_id: raw.get("medalloy", {}).get("cases", {}).get(c.case_id, {}) for c in cases}
    (tmp / "dataset.json").write_text(json.dumps(raw, indent=2), encoding="utf-8")
    tmp.rename(view)
    return view


def foreground(ds_path: Path) -> dict[str, int]:
    from medalloy.data.dataset import RawDataset

    return {k: v for k, v in RawDataset(ds_path).spec.labels.items() if v != 0}


def train_benchmark_expert(
    name: str,
    data: Path,
    work: Path,
    run: Path,
    budget: float,
    seed: int,
    plan_kw: dict[str, Any],
    what: str,
    init: Path | None = None,
    train_fraction: float = 1.0,
    warmup_steps: int = 0,
) -> dict[str, Any]:
    """A medalloy expert on the benchmark's train/val split of ``name`` for ``budget`` minutes,
    scored on its held-out cases: ``{"run", "scores", "seconds_per_case", "params", "minutes", "steps"}``.
    ``init``: a pretrain run its encoder starts from; ``train_fraction``: the share of the training
    cases whose labels it may use (a seeded sample; validation and test unchanged);
    ``warmup_steps``: a linear learning-rate warm-up before the poly decay (a fine-tuning recipe)."""
    import sys

    from medalloy.data.dataset import RawDataset
    from medalloy.planning.fingerprint import fingerprint
    from medalloy.planning.planner import plan_dataset
    from medalloy.recipes.expert import ExpertConfig, train_expert

    ds_path = member_folder(name, data, work)
    split = splits(name, dataset_path(name, data, work), seed)
    if train_fraction < 1.0:
        rng = np.random.default_rng(seed)
        keep = max(1, int(round(train_fraction * len(split["train"]))))
        split = {**split, "train": sorted(rng.choice(split["train"], keep, replace=False).tolist())}
    ds = RawDataset(ds_path)
    plan = plan_dataset(ds, fingerprint(ds, progress=False), **plan_kw)
    print(f"[{what}] {name}: {len(split['train'])} train / {len(split['test'])} test cases, {plan.dim}D patch {plan.patch_size}, {budget:g} min", flush=True)
    config = None
    if warmup_steps:
        config = ExpertConfig()
        config.train.warmup_steps = warmup_steps
    res = train_expert(
        ds_path, run, plan=plan, config=config, split={"train": split["train"], "val": split["val"]}, overwrite=True, progress=sys.stderr.isatty(),
        steps=1_000_000, time_budget_minutes=budget, val_every=200, seed=seed, init=init,
    )  # fmt: skip
    scores, sec = predict_and_score(run, ds_path, split["test"], foreground(ds_path), f"{what.replace(' ', '-')}-{name}", work)
    return {
        "run": str(run),
        "scores": scores,
        "seconds_per_case": round(sec, 3),
        "params": int(res["params"]),
        "minutes": round(res["seconds"] / 60, 2),
        "steps": int(res["steps"]),
    }
