"""The evaluate stage: every model predicts each of its datasets' held-out cases (``imagesTs``
against ``labelsTs``, or the cases the pipeline held out of ``imagesTr``) and is scored per task and per source (Dice, HD95, surface Dice), with its
parameters and its latency per image in its runtimes.

``RUN/<stage>/<model>/<dataset>/`` holds the predictions and ``summary.json`` (written last, so a
stage started again after a kill skips the pairs already scored); ``RUN/<stage>/results.json`` all rows.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from medalloy.jsonio import read_json, write_json_atomic
from medalloy.pipeline.graph import StagePlan
from medalloy.pipeline.stages import Context

RESULTS = "results.json"


def _latency(ctx: Context, model: dict[str, Any], dataset: str, runs: int) -> dict[str, float]:
    """Median ms of a batch-1 forward pass at the dataset's patch, in each runtime the model has here."""
    from medalloy.engine.latency import model_latency_ms
    from medalloy.engine.precision import cpu_supports_bf16
    from medalloy.recipes.registry import load_model

    net, plan, _ = load_model(ctx.path(model), "cpu", dataset=ctx.datasets[dataset].raw.name if len(model["datasets"]) > 1 else None)
    shape = (plan.in_channels, *plan.patch_size)
    if model["format"] == "onnx":
        return {"onnxruntime fp32": model_latency_ms(net, shape, runs=runs)}
    out = {"torch fp32": model_latency_ms(net, shape, "fp32", runs=runs)}
    if cpu_supports_bf16():
        out["torch bf16"] = model_latency_ms(net, shape, "bf16", runs=runs)
    return out


def _score(ctx: Context, model: dict[str, Any], dataset: str, folder: Path, overlays: bool) -> dict[str, Any] | None:
    """Predict and score the dataset's held-out cases: its imagesTs, or the cases the pipeline held out of imagesTr."""
    from medalloy.evaluation import evaluate_folders
    from medalloy.predict import predict_cases, predict_folder

    ds = ctx.datasets[dataset]
    as_dataset = ds.raw.name if len(model["datasets"]) > 1 else None
    split = ds.split()
    if split is not None:
        raw = ds.raw
        labels = folder / "labels"
        labels.mkdir(parents=True, exist_ok=True)
        for cid in split["test"]:
            shutil.copyfile(raw.case(cid).label, labels / f"{cid}{raw.spec.file_ending}")
        predict_cases(
            ctx.path(model), ds.path, split["test"], folder / "predictions", device="cpu", overwrite=True, progress=ctx.progress, as_dataset=as_dataset
        )
    else:
        images, labels = ds.path / "imagesTs", ds.path / "labelsTs"
        if not (images.is_dir() and labels.is_dir()):
            return None
        predict_folder(ctx.path(model), images, folder / "predictions", dataset=as_dataset, device="cpu", overwrite=True, progress=ctx.progress)
    keep_dataset_labels(folder / "predictions", _model_labels(ctx, model, as_dataset), dict(ds.raw.spec.labels))
    return evaluate_folders(folder / "predictions", labels, dataset=ds.path, out_dir=folder, overlays=overlays, overwrite=True, progress=ctx.progress)


def _model_labels(ctx: Context, model: dict[str, Any], as_dataset: str | None) -> dict[str, int]:
    from medalloy.recipes.registry import load_model

    return dict(load_model(ctx.path(model), "cpu", dataset=as_dataset)[1].labels)


def keep_dataset_labels(pred_dir: Path, model_labels: dict[str, int], dataset_labels: dict[str, int]) -> None:
    """Rewrite each prediction in the dataset's label values, by name; a class the dataset does not
    label becomes background (a student of lung and heart scored on a lung-only set)."""
    import numpy as np

    from medalloy.data.io import read_label, write_label

    pairs = [(v, dataset_labels[n]) for n, v in model_labels.items() if v != 0 and n in dataset_labels]
    if all(a == b for a, b in pairs) and {v for v in model_labels.values() if v} == {a for a, _ in pairs}:
        return  # the same names and values: nothing to rewrite
    for path in sorted(p for p in pred_dir.iterdir() if p.is_file()):
        pred, meta = read_label(path)
        out = np.zeros_like(pred)
        for a, b in pairs:
            out[pred == a] = b
        write_label(path, out, meta)


def run_evaluate(ctx: Context, p: StagePlan) -> dict[str, Any]:
    st = p.stage
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for stage in [n for n in ctx.records if n in p.needs]:  # the order they ran in
        for model in ctx.models_of(stage):
            for d in model["datasets"]:
                folder = ctx.root / p.name / model["name"].replace("/", "-") / d
                done = folder / "row.json"
                if done.is_file():
                    rows.append(read_json(done, "row.json", "delete the evaluate folder"))
                    continue
                ctx.log(f"{p.name}: {model['name']} on {d}'s held-out cases")
                result = _score(ctx, model, d, folder, st.overlays)  # type: ignore[attr-defined]
                if result is None:
                    skipped.append(d)
                    continue
                row = {
                    "model": model["name"], "stage": stage, "kind": ctx.records[stage]["kind"], "format": model["format"], "dataset": d,
                    "trained_by": model["from"].split("/")[0] if "from" in model else stage,  # an export's weights are its source stage's
                    "params": model.get("params"), "val_dice": model.get("val_dice", {}).get(d),
                    "latency_ms": _latency(ctx, model, d, st.latency_runs),  # type: ignore[attr-defined]
                    "summary": result["summary"], "folder": folder.relative_to(ctx.root).as_posix(),
                }  # fmt: skip
                write_json_atomic(done, row)
                rows.append(row)
    cross, notes = ([], [])
    if st.leave_one_source_out:  # type: ignore[attr-defined]
        from medalloy.pipeline.cross_source import cross_source_rows

        cross, notes = cross_source_rows(ctx, p)
    write_json_atomic(ctx.root / p.name / RESULTS, {"rows": rows, "cross_source": cross, "cross_source_notes": notes})
    note = f"{len(rows)} model x dataset rows" + (f", {len(cross)} cross-source rows" if cross else "")
    if skipped:
        note += f"; no held-out labels (imagesTs + labelsTs) in {', '.join(sorted(set(skipped)))}"
    return {"models": [], "rows": len(rows), "results": f"{p.name}/{RESULTS}", "note": note}
