"""``medalloy demo``: the whole pipeline on the built-in synthetic collection, in minutes on a CPU.

synth -> check -> plan -> train one expert per dataset -> predict held-out cases -> evaluate ->
one universal (Hermes) model for all datasets' tasks -> predict and evaluate it the same way ->
a tiny student distilled from the chest X-ray expert by relation KD, exported to ONNX and predicted
through ONNX Runtime -> the 2D experts amalgamated (KA2ER) into one SwinUNETR model of their tasks ->
image-report pretraining (HybridMED) on synthetic radiographs with reports, whose encoder starts the
chest X-ray expert again ->
``OUT/report.md`` (Dice tables, universal vs experts, student vs teacher with parameters and
latency, amalgamated vs experts, training curves, best/median/worst overlays).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from medalloy.data.dataset import RawDataset
from medalloy.errors import MedalloyError
from medalloy.jsonio import write_json_atomic, write_text_atomic
from medalloy.runs import prepare_output

# Steps per expert: enough for Dice > 0.9 on every synthetic task; about a minute each on 2 cores.
DEMO_STEPS = {2: 120, 3: 120}
# One universal model for the 5 tasks of the 4 datasets (mixed batches). 300 steps left the MR core
# at 0.770 (90 % of its expert's 0.859 needed), 450 reach 0.793 (92 %) in 117 s (`make demo`, 2026-12-02);
# with the exclusive class term and the prior start, 0.815 of 0.864 (94 %), MR organ 0.774 of 0.835;
# with the MR slices counted one by one in the sampling weights (2026-12-03), core 0.870 of 0.859, organ 0.794 of 0.830.
# With fusion at the bottleneck only (the default since 2026-12-04): core 0.843 of 0.859 (98 %), organ 0.790 of 0.830.
UNIVERSAL_STEPS = 450
# The synthetic images are small (MR slices 40x48, X-rays and endoscopy up to ~128): a 96 px patch
# shared in mixed batches holds them; each dataset at its own field of view (the CLI's default)
# reached MR core 0.752 / organ 0.630 at 300 steps against 0.770 / 0.679 here (docs/methods/hermes.md).
UNIVERSAL_PATCH = 96
# The student (relation KD, tiny) learns the chest X-ray expert; 220 steps on its 2 labels.
DISTILL_STEPS = 220
DISTILL_DATASET = "SynthCXR"
# The 2D experts (chest X-ray lung + heart, lung only, RGB endoscopy) amalgamated into one SwinUNETR
# (feature size 12) with their frozen features; batch 8 of each dataset's own field of view. 200 steps:
# 113 s, lung 0.977 / 0.981, heart 0.936, lesion 0.876 against the experts' 0.983 / 0.986 / 0.978 / 0.966
# (`make demo` 6.8 min in all, 2026-12-02); 140 steps since the pretraining stage came (the demo's budget):
# 115 s, lung 0.976 / 0.979, heart 0.916, lesion 0.853 (`make demo` 11.9 min in all on a slower machine, 2026-12-03).
# Since two datasets a step and expert priors (2026-12-04): 70 steps of two datasets' batches, the
# same images as 140 one-dataset steps; the priors start each task at its expert: 122 s, lung 0.963 /
# 0.986, heart 0.971, lesion 0.969 (`make demo` 10.9 min in all, 2026-12-04).
AMALGAMATE_STEPS = 70
AMALGAMATE_BATCH = 8
# Image-report pretraining (HybridMED) on synthetic radiographs with reports (4 findings), at the chest
# X-ray expert's 112 px so its encoder fits that expert's plan; then that expert retrained from it. The
# text side at half the default width and depth, for the demo's budget (`make demo`, 2026-12-03: the
# default model, 300 steps, 228 s, zero-shot 0.600, BLEU-4 0.416; these settings 115 s, 0.550, 0.290).
PRETRAIN_CASES = 160
PRETRAIN_TEST_CASES = 40
PRETRAIN_SIZE = 112
PRETRAIN_STEPS = 250
PRETRAIN_SUMMARY_STEPS = 120
PRETRAIN_TEXT = {"width": 128, "text_layers": 2, "decoder_layers": 2}
DEMO_MARKER = "demo.json"


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"[medalloy demo] {msg}", flush=True)


def run_demo(out: str | Path = "runs/demo", overwrite: bool = False, steps: int | None = None, seed: int = 0, progress: bool = True) -> Path:
    """Run the demo into ``out``; returns the path of ``report.md``."""
    from medalloy.data.check import check_dataset, format_report
    from medalloy.data.synth import generate_collection
    from medalloy.evaluation import evaluate_folders
    from medalloy.planning.plan import save_plan
    from medalloy.planning.planner import plan_dataset
    from medalloy.predict import predict_folder
    from medalloy.recipes.expert import train_expert

    t0 = time.perf_counter()
    root = prepare_output(out, overwrite=overwrite, marker=DEMO_MARKER)
    write_json_atomic(root / DEMO_MARKER, {"status": "running", "seed": seed})
    _log(f"1/6 synthesising the demo collection into {root / 'data'}", progress)
    datasets = generate_collection(root / "data", seed=seed, progress=progress)
    rows: list[dict[str, Any]] = []
    for ds_path in datasets:
        ds = RawDataset(ds_path)
        name = ds.name
        _log(f"2/6 {name}: checking", progress)
        problems = check_dataset(ds_path, progress=False)
        if problems:
            raise MedalloyError(f"synthetic dataset failed its check:\n{format_report(problems, ds_path)}", ds_path, "report this as a bug")
        _log(f"3/6 {name}: planning", progress)
        plan = plan_dataset(ds)
        save_plan(plan, root / "plans" / f"{name}.json")
        n_steps = steps or DEMO_STEPS[plan.dim]
        _log(f"4/6 {name}: training an expert ({plan.dim}D, patch {plan.patch_size}, {n_steps} steps)", progress)
        run = root / "experts" / name
        res = train_expert(ds_path, run, plan=plan, steps=n_steps, seed=seed, val_every=max(20, n_steps // 3), progress=progress)
        _log(f"5/6 {name}: predicting {len(ds.test_cases())} held-out cases", progress)
        pred_dir = root / "predictions" / name
        predict_folder(run, ds_path / "imagesTs", pred_dir, progress=progress)
        _log(f"6/6 {name}: evaluating", progress)
        ev = evaluate_folders(pred_dir, ds_path / "labelsTs", dataset=ds_path, out_dir=root / "evaluation" / name, progress=progress)
        rows.append({"dataset": name, "plan": plan, "train": res, "eval": ev, "run": run})
    universal = _universal_stage(root, datasets, steps or UNIVERSAL_STEPS, seed, progress)
    student = _distill_stage(root, next(r for r in rows if r["dataset"] == DISTILL_DATASET), steps or DISTILL_STEPS, seed, progress)
    amalgamated = _amalgamate_stage(root, [r for r in rows if r["plan"].dim == 2], steps or AMALGAMATE_STEPS, seed, progress)
    pretrained = _pretrain_stage(root, next(r for r in rows if r["dataset"] == DISTILL_DATASET), steps, seed, progress)
    report = _write_report(root, rows, time.perf_counter() - t0, universal, student, amalgamated, pretrained)
    write_json_atomic(root / DEMO_MARKER, {"status": "done", "seed": seed, "seconds": time.perf_counter() - t0})
    _log(f"done in {time.perf_counter() - t0:.0f} s: {report}", progress)
    return report


def _predict_each(root: Path, run: Path, datasets: list[Path], tag: str, progress: bool) -> dict[str, Any]:
    """A model of several datasets predicts and is evaluated on each one's held-out cases
    (``predictions-<tag>/``, ``evaluation-<tag>/``)."""
    from medalloy.evaluation import evaluate_folders
    from medalloy.predict import predict_folder

    evals = {}
    for ds_path in datasets:
        name = RawDataset(ds_path).name
        _log(f"{tag}: predicting and evaluating {name}", progress)
        pred_dir = root / f"predictions-{tag}" / name
        predict_folder(run, ds_path / "imagesTs", pred_dir, dataset=name, progress=progress)
        evals[name] = evaluate_folders(pred_dir, ds_path / "labelsTs", dataset=ds_path, out_dir=root / f"evaluation-{tag}" / name, progress=progress)
    return evals


def _universal_stage(root: Path, datasets: list[Path], steps: int, seed: int, progress: bool) -> dict[str, Any]:
    """One Hermes model on every demo dataset, predicted and evaluated per dataset."""
    from medalloy.recipes.universal import train_universal

    run = root / "universal"
    _log(f"universal: one Hermes model for the tasks of all {len(datasets)} datasets ({steps} steps, mixed batches)", progress)
    res = train_universal(datasets, run, steps=steps, seed=seed, val_every=max(20, steps // 3), patch_size=UNIVERSAL_PATCH, progress=progress)
    return {"train": res, "eval": _predict_each(root, run, datasets, "universal", progress), "run": run}


def _distill_stage(root: Path, teacher: dict[str, Any], steps: int, seed: int, progress: bool) -> dict[str, Any]:
    """A tiny student of one expert (relation KD), exported to ONNX, predicted through ONNX Runtime."""
    from medalloy.engine.latency import model_latency_ms
    from medalloy.evaluation import evaluate_folders
    from medalloy.export import export_onnx
    from medalloy.interop.onnx_runtime import load_onnx
    from medalloy.predict import load_model, predict_folder
    from medalloy.recipes.distill import train_distill

    name, ds_path = teacher["dataset"], Path(teacher["train"]["dataset"])
    run = root / "student"
    _log(f"distill: a tiny student of the {name} expert (relation KD, {steps} steps)", progress)
    res = train_distill(ds_path, teacher["run"], run, steps=steps, seed=seed, val_every=max(20, steps // 3), progress=progress)
    onnx_file = run / "student.onnx"
    _log(f"distill: exporting the student to {onnx_file} and predicting through ONNX Runtime", progress)
    export_onnx(run, onnx_file, overwrite=True)
    pred_dir = root / "predictions-student" / name
    predict_folder(onnx_file, ds_path / "imagesTs", pred_dir, progress=progress)
    ev = evaluate_folders(pred_dir, ds_path / "labelsTs", dataset=ds_path, out_dir=root / "evaluation-student" / name, progress=progress)
    teacher_model, plan, _ = load_model(teacher["run"] / "checkpoints" / "best.safetensors")
    shape = (plan.in_channels, *plan.patch_size)
    latency = {
        "teacher eager fp32": model_latency_ms(teacher_model, shape, "fp32", runs=20),
        "teacher eager bf16": model_latency_ms(teacher_model, shape, "bf16", runs=20),
        "student ONNX Runtime fp32": model_latency_ms(load_onnx(onnx_file)[0], shape, runs=20),
    }
    return {"dataset": name, "train": res, "eval": ev, "run": run, "latency_ms": latency, "patch": plan.patch_size}


def _amalgamate_stage(root: Path, experts: list[dict[str, Any]], steps: int, seed: int, progress: bool) -> dict[str, Any]:
    """The 2D experts, frozen, amalgamated into one SwinUNETR model of their datasets' tasks."""
    from medalloy.recipes.amalgamate import train_amalgamate

    datasets = [Path(r["train"]["dataset"]) for r in experts]
    run = root / "amalgamated"
    _log(f"amalgamate: {len(experts)} frozen experts into one SwinUNETR model ({steps} steps)", progress)
    res = train_amalgamate(
        datasets, [r["run"] for r in experts], run, steps=steps, seed=seed, val_every=max(20, steps // 2), batch_size=AMALGAMATE_BATCH, progress=progress
    )
    return {"train": res, "eval": _predict_each(root, run, datasets, "amalgamated", progress), "run": run}


def _pretrain_stage(root: Path, xray: dict[str, Any], steps: int | None, seed: int, progress: bool) -> dict[str, Any]:
    """HybridMED pretraining on synthetic radiographs with reports; zero-shot and captions on held-out
    images; the chest X-ray expert trained again from the pretrained encoder."""
    import numpy as np

    from medalloy.data.reports import ReportColumns, read_report_pairs
    from medalloy.data.synth_reports import CLASSES, generate_report_pairs
    from medalloy.evaluation import evaluate_folders
    from medalloy.predict import predict_folder
    from medalloy.engine.metrics import caption_scores
    from medalloy.engine.radiograph_encoding import encode_images
    from medalloy.models.image_text import encode_texts, generate_impressions, zero_shot_probs
    from medalloy.recipes.expert import train_expert
    from medalloy.recipes.pretrain import PretrainConfig, load_pretrained, pretrain

    pairs = generate_report_pairs(root / "data" / "reports", n_cases=PRETRAIN_CASES, size=PRETRAIN_SIZE, seed=seed, progress=progress)
    held = generate_report_pairs(root / "data" / "reports-test", n_cases=PRETRAIN_TEST_CASES, text_only=0, size=PRETRAIN_SIZE, seed=seed + 1000, progress=progress)
    run = root / "pretrain"
    n_steps = steps or PRETRAIN_STEPS
    _log(f"pretrain: HybridMED on {PRETRAIN_CASES} synthetic radiograph-report pairs ({PRETRAIN_SUMMARY_STEPS} summarization + {n_steps} joint steps)", progress)
    res = pretrain(
        pairs / "pairs.csv", run, text_only=pairs / "reports.csv", image_size=PRETRAIN_SIZE, steps=n_steps, summarize_steps=steps or PRETRAIN_SUMMARY_STEPS,
        config=PretrainConfig(text_encoder="scratch", **PRETRAIN_TEXT), seed=seed, val_every=max(20, n_steps // 3), progress=progress,
    )  # fmt: skip
    model, enc_tok, dec_tok, record = load_pretrained(run)
    test = read_report_pairs(held / "pairs.csv", ReportColumns(label="finding")).pairs
    emb, patches = encode_images(model, [p.image for p in test], PRETRAIN_SIZE)
    probs = zero_shot_probs(emb, encode_texts(model, enc_tok, list(CLASSES), record["spec"]["max_impression_len"]), record["temperature"])
    zeroshot = float(np.mean([CLASSES[int(i)] == p.label for i, p in zip(probs.argmax(1), test)]))
    captions = generate_impressions(model, dec_tok, patches)
    scores = caption_scores(captions, [p.impression for p in test])
    name, ds_path = xray["dataset"], Path(xray["train"]["dataset"])
    expert_run = root / "experts-pretrained" / name
    n_expert = steps or DEMO_STEPS[2]
    _log(f"pretrain: the {name} expert again, its encoder started from the pretrained one ({n_expert} steps)", progress)
    exp = train_expert(ds_path, expert_run, plan=xray["plan"], init=run, steps=n_expert, seed=seed, val_every=max(20, n_expert // 3), progress=progress)
    pred_dir = root / "predictions-pretrained" / name
    predict_folder(expert_run, ds_path / "imagesTs", pred_dir, progress=progress)
    ev = evaluate_folders(pred_dir, ds_path / "labelsTs", dataset=ds_path, out_dir=root / "evaluation-pretrained" / name, progress=progress)
    return {
        "train": res, "run": run, "zeroshot_acc": zeroshot, "captions": list(zip([p.impression for p in test], captions))[:4], **scores,
        "held_out": len(test), "dataset": name, "expert": exp, "eval": ev,
    }  # fmt: skip


def _write_report(
    root: Path,
    rows: list[dict[str, Any]],
    seconds: float,
    universal: dict[str, Any] | None = None,
    student: dict[str, Any] | None = None,
    amalgamated: dict[str, Any] | None = None,
    pretrained: dict[str, Any] | None = None,
) -> Path:
    from medalloy.evaluation import markdown_table

    lines = [
        "# medalloy demo report",
        "",
        f"Synthetic multi-site collection, one expert per dataset, evaluated on held-out cases (`imagesTs/`). "
        f"Total time {seconds / 60:.1f} min.",
        "",
        "## Dice per task (held-out cases)",
        "",
        "| dataset | dim | label | Dice | HD95 | NSD | train s | params |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        summary = r["eval"]["summary"]
        for label, stats in summary["classes"].items():
            lines.append(
                f"| {r['dataset']} | {r['plan'].dim}D | {label} | {stats['dice']['mean']:.3f} | {stats['hd95']['mean']:.2f} | "
                f"{stats['nsd']['mean']:.3f} | {r['train']['seconds']:.0f} | {r['train']['params']:,} |"
            )
    if universal is not None:
        res = universal["train"]
        lines += [
            "",
            "## Universal model (Hermes) vs experts",
            "",
            f"One network ({res['params']:,} parameters) for the tasks {', '.join(res['tasks'])}, conditioned on task and "
            f"modality priors, trained on mixed batches of all datasets in {res['seconds']:.0f} s; the experts above are "
            f"{len(rows)} networks ({sum(r['train']['params'] for r in rows):,} parameters together).",
            "",
            "| dataset | label | expert Dice | universal Dice |",
            "|---|---|---|---|",
        ]
        for r in rows:
            uni = universal["eval"][r["dataset"]]["summary"]["classes"]
            for label, stats in r["eval"]["summary"]["classes"].items():
                u = uni.get(label, {}).get("dice", {}).get("mean")
                lines.append(f"| {r['dataset']} | {label} | {stats['dice']['mean']:.3f} | {'-' if u is None else f'{u:.3f}'} |")
        curve = universal["run"] / "training_curve.png"
        if curve.exists():
            lines += ["", f"![universal training curve]({curve.relative_to(root).as_posix()})"]
    if student is not None:
        res, teacher = student["train"], next(r for r in rows if r["dataset"] == student["dataset"])
        lat = student["latency_ms"]
        lines += [
            "",
            "## Distilled student (relation KD) through ONNX Runtime",
            "",
            f"A tiny U-Net ({res['params']:,} parameters, {res['teacher_params'] / res['params']:.1f}x fewer than its teacher) learned the "
            f"{student['dataset']} expert's outputs and feature relations in {res['seconds']:.0f} s, was exported to ONNX "
            f"(`{(student['run'] / 'student.onnx').relative_to(root).as_posix()}`) and predicted the held-out cases through ONNX Runtime. "
            f"Latency: median of 20 batch-1 forward passes at {'x'.join(map(str, student['patch']))} on this machine.",
            "",
            "| label | teacher Dice | student Dice (ONNX Runtime) |",
            "|---|---|---|",
        ]
        for label, stats in teacher["eval"]["summary"]["classes"].items():
            st = student["eval"]["summary"]["classes"].get(label, {}).get("dice", {}).get("mean")
            lines.append(f"| {label} | {stats['dice']['mean']:.3f} | {'-' if st is None else f'{st:.3f}'} |")
        lines += ["", "| model | runtime | ms per image |", "|---|---|---|"]
        for what, ms in lat.items():
            who, runtime = what.split(" ", 1)
            lines.append(f"| {who} | {runtime} | {ms:.1f} |")
    if amalgamated is not None:
        res = amalgamated["train"]
        lines += [
            "",
            "## Amalgamated model (KA2ER) vs experts",
            "",
            f"One SwinUNETR model ({res['trainable_params']:,} trainable parameters; {res['params']:,} with the frozen experts inside) "
            f"learned the tasks of {len(amalgamated['eval'])} datasets in {res['steps']} steps ({res['seconds']:.0f} s), "
            "merging the frozen 2D experts' features by hierarchical attention and answering through a prompt decoder that corrects each task's own experts' log-odds (expert priors).",
            "",
            "| dataset | label | expert Dice | amalgamated Dice |",
            "|---|---|---|---|",
        ]
        for r in rows:
            if r["dataset"] not in amalgamated["eval"]:
                continue
            ka = amalgamated["eval"][r["dataset"]]["summary"]["classes"]
            for label, stats in r["eval"]["summary"]["classes"].items():
                a = ka.get(label, {}).get("dice", {}).get("mean")
                lines.append(f"| {r['dataset']} | {label} | {stats['dice']['mean']:.3f} | {'-' if a is None else f'{a:.3f}'} |")
        curve = amalgamated["run"] / "training_curve.png"
        if curve.exists():
            lines += ["", f"![amalgamation training curve]({curve.relative_to(root).as_posix()})"]
    if pretrained is not None:
        res = pretrained["train"]
        lines += [
            "",
            "## Image-report pretraining (HybridMED)",
            "",
            f"An X-ray encoder (the {pretrained['dataset']} expert's U-Net encoder), a text encoder and a two-branch report decoder learned "
            f"from {res['train_pairs']} synthetic radiographs with reports (+{res['text_only_pairs']} text-only reports for the summarization "
            f"stage) in {(res['seconds'] + (res['summarize'] or {}).get('seconds', 0)):.0f} s. On {pretrained['held_out']} held-out radiographs: "
            f"zero-shot accuracy over the 4 findings {pretrained['zeroshot_acc']:.3f} (chance 0.25); generated impressions BLEU-4 "
            f"{pretrained['bleu4']:.3f}, ROUGE-L {pretrained['rougeL']:.3f}.",
            "",
            "| reference impression | generated |",
            "|---|---|",
            *[f"| {ref} | {gen} |" for ref, gen in pretrained["captions"]],
            "",
            f"The {pretrained['dataset']} expert trained again for the same steps, its encoder started from the pretrained one "
            "(`medalloy train expert DATASET --init RUN`):",
            "",
            "| label | expert Dice (random init) | expert Dice (pretrained init) |",
            "|---|---|---|",
        ]
        base = next(r for r in rows if r["dataset"] == pretrained["dataset"])
        for label, stats in base["eval"]["summary"]["classes"].items():
            p = pretrained["eval"]["summary"]["classes"].get(label, {}).get("dice", {}).get("mean")
            lines.append(f"| {label} | {stats['dice']['mean']:.3f} | {'-' if p is None else f'{p:.3f}'} |")
    lines += ["", "## Per dataset", ""]
    for r in rows:
        name = r["dataset"]
        ev_dir = root / "evaluation" / name
        lines += [f"### {name}", "", markdown_table(r["eval"]["summary"]), ""]
        curve = r["run"] / "training_curve.png"
        if curve.exists():
            lines += [f"![training curve]({curve.relative_to(root).as_posix()})", ""]
        for png in sorted(ev_dir.glob("overlay_*.png")):
            lines += [f"![{png.stem}]({png.relative_to(root).as_posix()})"]
        lines.append("")
    path = root / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
