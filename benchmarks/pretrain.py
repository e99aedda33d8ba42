"""Image-report pretraining (HybridMED) against random init and two simpler objectives, on the real
chest X-ray data of ../shared/data, with every downstream use the issue names.

    python -m benchmarks.pretrain [--data ../shared/data] [--budget-minutes 8] [--seg-minutes 2]
                                  [--seeds 0 1 2] [--only global_only token_level hybridmed] [--skip-seg]
    python -m benchmarks.pretrain --text-encoder minilm --work runs/bench-pretrain-minilm \
        --results benchmarks/results/pretrain/minilm --random-from benchmarks/results/pretrain
    python -m benchmarks.pretrain --report      # re-render the markdown from the raw results

Data: ``CXR-Text/covid_cxr_notes.csv`` (459 radiographs; findings = the clinical ``notes``,
impression = the diagnosis ``finding``), split by patient: 25 % of the patients are held out for
every downstream score (never pretrained on); ``CXR-Text/iu_xray_reports.csv`` (3,331 findings ->
impression reports, text only) feeds the summarization stage of the HybridMED arm.

Arms (same image encoder: the U-Net encoder of a 224 px X-ray plan, same budget, same split):
``random`` (no pretraining), ``global_only`` (image <-> impression InfoNCE: ConVIRT/CLIP style),
``token_level`` (+ patch <-> word alignment: GLoRIA/MGCA style), ``hybridmed`` (+ summarization,
captioning and distillation; its budget includes stage 1).

Downstream, on the held-out patients' images:
1. zero-shot: every distinct ``finding`` of the held-out set is a prompt; the predicted finding's
   group (COVID-19 / other pneumonia / no finding) against the true group: accuracy (and balanced);
2. linear probe on the encoder's pooled bottleneck features, the three groups, 1 / 10 / 100 % of
   the pretraining images' labels (stratified, at least one a class);
3. retrieval image -> impression, Recall@1/5/10 (an identical impression counts as the image's own;
   ``retrieval_r10`` is "not scored" in results from before it was added: ``--rescore`` adds it);
4. captioning (HybridMED only): BLEU-4 (sacrebleu) and ROUGE-L (rouge-score);
5. segmentation: JSRT and Shenzhen lung experts (the shared benchmark splits) with 10 % and 100 % of
   their training labels, ``--init`` from each arm vs random init, ``--seg-minutes`` each; test Dice.

Text encoder: ``scratch`` (default; a small transformer trained on the reports) or ``minilm`` (the
packaged all-MiniLM-L6-v2, ``medalloy[text]``). The random arm has no text side, so a MiniLM table
may take its rows from the scratch table's raw results (``--random-from DIR``) instead of
retraining the same segmentation experts. ``--token-scope pair`` trains the token-level term within
each image-report pair (MGCA's form, ``B`` times cheaper than the all-pairs GLoRIA form), so the
token_level and hybridmed arms take more steps in the same budget; give it its own ``--work``.

Writes ``benchmarks/results/pretrain/results.json`` (the issue's shape: means over seeds),
``raw.json`` (every seed) and ``results.md``; what the runs found is written by people in
docs/methods/pretraining.md (its history in docs/research/pretraining.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import train_benchmark_expert

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "pretrain"
ARMS = ("random", "global_only", "token_level", "hybridmed")
LOSSES = {"global_only": ["global"], "token_level": ["global", "token"], "hybridmed": ["global", "token", "generation"]}
SEG = ("JSRT", "Shenzhen")
FRACTIONS = {"1": 0.01, "10": 0.1, "100": 1.0}
USES = (
    "zeroshot_acc", "zeroshot_balanced_acc", "linear_probe_acc_1", "linear_probe_acc_10", "linear_probe_acc_100",
    "linear_probe_bacc_1", "linear_probe_bacc_10", "linear_probe_bacc_100",
    "retrieval_r1", "retrieval_r5", "retrieval_r10", "caption_bleu4", "caption_rougeL", "seg_dice_10", "seg_dice_100",
)  # fmt: skip
# uses added after results were first written: where an arm has the other use of the same scoring
# pass but not this one, its rows predate the use ("not scored"), rather than the use not applying (null)
ADDED_LATER = {"retrieval_r10": "retrieval_r1"}
TEST_FRACTION = 0.25
IMAGE_SIZE = 224


def impression_key(text: str) -> str:
    """An impression as retrieval compares it: identical keys count as the image's own text."""
    return " ".join(text.lower().split())


def group(finding: str) -> str:
    if "COVID-19" in finding:
        return "COVID-19"
    if finding.strip().lower() == "no finding":
        return "No Finding"
    return "Other pneumonia"


def prepare_pairs(data: Path, work: Path):
    """Pretraining CSV (held-out patients removed, image paths absolute) and the held-out pairs."""
    from medalloy.data.reports import ReportColumns, read_report_pairs, split_by_patient

    columns = ReportColumns(findings="notes", impression="finding", label="finding")
    table = read_report_pairs(data / "CXR-Text" / "covid_cxr_notes.csv", columns)
    train, test = split_by_patient(table.pairs, TEST_FRACTION, seed=0)  # one held-out set for every seed and arm
    out = work / "pretrain_pairs.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "patient", "notes", "finding"])
        for p in train:
            w.writerow([str(p.image), p.patient, p.findings, p.impression])
    return out, columns, train, test


def pretrain_arm(
    arm: str, seed: int, pairs_csv: Path, columns, data: Path, work: Path, budget: float, text_encoder: str = "scratch", token_scope: str = "batch"
) -> Path:
    from medalloy.recipes.pretrain import PretrainConfig, pretrain

    run = work / "runs" / f"{arm}-s{seed}"
    if (run / "run.json").exists() and json.loads((run / "run.json").read_text()).get("status") == "done":
        print(f"[pretrain] {arm} seed {seed}: done already ({run})", flush=True)
        return run
    print(f"[pretrain] {arm} seed {seed}: {budget:g} min, {text_encoder} text encoder", flush=True)
    cfg = PretrainConfig(columns=columns.model_copy(update={"label": None}), text_encoder=text_encoder, token_scope=token_scope)
    text_only = data / "CXR-Text" / "iu_xray_reports.csv" if "generation" in LOSSES[arm] else None
    pretrain(
        pairs_csv, run, text_only=text_only, config=cfg, overwrite=True, progress=sys.stderr.isatty(), losses=LOSSES[arm],
        image_size=IMAGE_SIZE, steps=1_000_000, summarize_steps=1_000_000, time_budget_minutes=budget, seed=seed,
    )  # fmt: skip
    return run


def encoder_features(model, paths: list[Path], batch: int = 16):
    """Pooled bottleneck features ``(N, C)`` (the encoder a downstream model would start from): the
    library's, which ``medalloy probe`` uses too."""
    from medalloy.engine.radiograph_encoding import encoder_features as features

    return features(model, paths, IMAGE_SIZE, batch)


def score_arm(arm: str, seed: int, run: Path | None, train, test) -> dict[str, Any]:
    """Downstream uses 1-4 for one arm and seed (``run`` None: random init)."""
    import torch

    from medalloy.engine.linear_probe import linear_probe
    from medalloy.engine.metrics import balanced_accuracy, caption_scores, retrieval_recall
    from medalloy.engine.radiograph_encoding import encode_images
    from medalloy.models.image_text import encode_texts, generate_impressions, zero_shot_probs
    from medalloy.planning.planner import plan_images_2d
    from medalloy.recipes.pretrain import load_pretrained
    from medalloy.seeding import seed_everything

    test_groups = np.array([group(p.impression) for p in test])
    train_groups = np.array([group(p.impression) for p in train])
    row: dict[str, Any] = {}
    if run is None:
        from medalloy.models.image_encoder import UNetEncoder

        seed_everything(seed)
        plan = plan_images_2d(IMAGE_SIZE)
        encoder = UNetEncoder(plan.network, plan.in_channels, plan.num_classes).eval()

        class _Random(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.image = encoder

        model = _Random()
    else:
        model, enc_tok, dec_tok, record = load_pretrained(run)
    tr_f, te_f = encoder_features(model, [p.image for p in train]), encoder_features(model, [p.image for p in test])
    for key, frac in FRACTIONS.items():
        row[f"linear_probe_acc_{key}"] = linear_probe(tr_f, train_groups, te_f, test_groups, frac, seed)
        row[f"linear_probe_bacc_{key}"] = linear_probe(tr_f, train_groups, te_f, test_groups, frac, seed, balanced=True)
    if run is None:
        return row
    g, patches = encode_images(model, [p.image for p in test], IMAGE_SIZE)
    findings = sorted({p.impression for p in test})
    txt = encode_texts(model, enc_tok, findings, record["spec"]["max_impression_len"])
    pred = zero_shot_probs(g, txt, record["temperature"]).argmax(1).numpy()
    pred_groups = np.array([group(findings[i]) for i in pred])
    row["zeroshot_acc"] = float(np.mean(pred_groups == test_groups))
    row["zeroshot_balanced_acc"] = balanced_accuracy(pred_groups, test_groups)
    imp_emb = encode_texts(model, enc_tok, [p.impression for p in test], record["spec"]["max_impression_len"])
    r = retrieval_recall(g, imp_emb, keys=[impression_key(p.impression) for p in test], ks=(1, 5, 10))
    row["retrieval_r1"], row["retrieval_r5"], row["retrieval_r10"] = r["r1"], r["r5"], r["r10"]
    if "generation" in record["losses"]:
        caps = generate_impressions(model, dec_tok, patches)
        s = caption_scores(caps, [p.impression for p in test])
        row["caption_bleu4"], row["caption_rougeL"] = s["bleu4"], s["rougeL"]
        row["caption_examples"] = [[p.impression, c] for p, c in list(zip(test, caps))[:5]]
    return row


def seg_arm(arm: str, seed: int, run: Path | None, data: Path, work: Path, minutes: float, warmup: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    suffix = f"-warmup{warmup}" if warmup else ""
    for frac_key, frac in (("10", 0.1), ("100", 1.0)):
        dice = []
        for name in SEG:
            res = train_benchmark_expert(
                name,
                data,
                work,
                work / "runs" / "seg" / f"{arm}-s{seed}-{name}-{frac_key}{suffix}",
                minutes,
                seed,
                {},
                f"seg {arm}",
                init=run,
                train_fraction=frac,
                warmup_steps=warmup,
            )
            out[f"{name}_{frac_key}"] = {
                "dice": res["scores"]["lung"]["dice"],
                "steps": res["steps"],
                "minutes": res["minutes"],
                "val_curve": val_curve(Path(res["run"])),
            }
            dice.append(res["scores"]["lung"]["dice"])
        out[f"seg_dice_{frac_key}"] = float(np.mean(dice))
    return out


CURVE_STEPS = (200, 400, 600)  # where the seg experts' validation Dice is compared (val every 200 steps)


def val_curve(run: Path) -> dict[str, float]:
    """A seg expert's validation Dice by step, from its metrics.jsonl (empty when the run is gone)."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {str(r["step"]): round(r["val/dice"], 4) for r in rows if r.get("kind") == "val" and "val/dice" in r}


def backfill_curves(raw: dict[str, Any], work: Path) -> int:
    """Add ``val_curve`` to every seg row whose run is still in ``work``; returns how many."""
    n = 0
    for arm, rows in raw.items():
        for seed, row in rows.items():
            for key, cell in row.items():
                if isinstance(cell, dict) and "dice" in cell and "val_curve" not in cell:
                    curve = val_curve(work / "runs" / "seg" / f"{arm}-s{seed}-{key.replace('_', '-')}")
                    if curve:
                        cell["val_curve"], n = curve, n + 1
    return n


def curve_lines(raw: dict[str, Any]) -> list[str]:
    """Mean validation Dice of the seg experts at ``CURVE_STEPS``, per arm and label fraction, over the
    seeds and datasets that have a curve: whether a pretrained start helps before training saturates."""
    cells: dict[tuple[str, str], dict[int, list[float]]] = {}
    seeds: dict[tuple[str, str], set[str]] = {}
    for arm in ARMS:
        for seed, row in raw.get(arm, {}).items():
            for name in SEG:
                for frac in ("10", "100"):
                    curve = (row.get(f"{name}_{frac}") or {}).get("val_curve") or {}
                    for step in CURVE_STEPS:
                        if str(step) in curve:
                            cells.setdefault((arm, frac), {}).setdefault(step, []).append(curve[str(step)])
                            seeds.setdefault((arm, frac), set()).add(seed)
    if not cells:
        return []
    lines = [
        "", "Segmentation experts' validation Dice by training step (mean over JSRT and Shenzhen and the seeds with runs on disk):", "",
        "| arm | labels | " + " | ".join(f"step {s}" for s in CURVE_STEPS) + " | seeds |", "|---|---|" + "---|" * (len(CURVE_STEPS) + 1),
    ]  # fmt: skip
    for (arm, frac), by_step in cells.items():
        vals = " | ".join(f"{np.mean(by_step[s]):.3f}" if s in by_step else "" for s in CURVE_STEPS)
        lines.append(f"| {arm} | {frac} % | {vals} | {', '.join(sorted(seeds[(arm, frac)]))} |")
    return lines


def text_encoders(raw: dict[str, Any]) -> str:
    """Which text encoder the pretrained arms used (rows from before the flag: scratch)."""
    kinds = {r.get("text_encoder", "scratch") for arm, rows in raw.items() if arm != "random" for r in rows.values()}
    return "+".join(sorted(kinds)) or "scratch"


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    downstream: dict[str, dict[str, Any]] = {u: {} for u in USES}
    spread: dict[str, dict[str, Any]] = {u: {} for u in USES}
    counted: dict[str, dict[str, list[int]]] = {u: {} for u in USES}
    for use in USES:
        for arm in ARMS:
            seeds = sorted(int(s) for s, r in raw.get(arm, {}).items() if r.get(use) is not None)
            vals = [raw[arm][str(s)][use] for s in seeds]
            downstream[use][arm] = round(float(np.mean(vals)), 4) if vals else None
            spread[use][arm] = round(float(np.std(vals)), 4) if len(vals) > 1 else None
            counted[use][arm] = seeds
    return {
        "downstream": downstream, "std_over_seeds": spread, "seeds_counted": counted, "text_encoder": text_encoders(raw),
        "seeds": sorted({int(s) for arm in raw.values() for s in arm}), "cost": cost(raw),
    }  # fmt: skip


def cost(raw: dict[str, Any]) -> dict[str, Any]:
    """Per pretrained arm: mean pretraining minutes and steps over its seeds, the largest peak RSS
    (``peak_scope`` "arm": measured over that arm alone; "process": the benchmark process's peak by
    then, an upper bound, for rows from before the per-arm window)."""
    out: dict[str, Any] = {}
    for arm in ARMS:
        rows = [r["pretrain"] for r in raw.get(arm, {}).values() if "pretrain" in r]
        if not rows:
            continue
        scopes = {r.get("peak_scope", "process") for r in rows}
        out[arm] = {
            "pretrain_minutes": round(float(np.mean([r["minutes"] for r in rows])), 2),
            "steps": round(float(np.mean([r["steps"] for r in rows])), 1),
            "summarize_steps": round(float(np.mean([r.get("summarize_steps") or 0 for r in rows])), 1),
            "peak_mb": round(float(max(r["peak_mb"] for r in rows))),
            "peak_scope": "arm" if scopes == {"arm"} else "process",
            "seeds": len(rows),
        }
    return out


def reference_scores(test) -> dict[str, Any]:
    """What a constant guess scores on the held-out set (the floor every probe must clear)."""
    groups = [group(p.impression) for p in test]
    top = max(set(groups), key=groups.count)
    keys = [impression_key(p.impression) for p in test]
    by_count = sorted(set(keys), key=lambda k: (-keys.count(k), k))
    # ranking the k most common impressions first for every image, whatever the image
    floor = {f"r{k}": round(sum(key in by_count[:k] for key in keys) / len(keys), 4) for k in (1, 5, 10)}
    return {
        "n": len(groups), "majority": top, "majority_acc": round(groups.count(top) / len(groups), 4),
        "constant_balanced_acc": round(1 / len(set(groups)), 4), "retrieval_floor": floor,
    }  # fmt: skip


# the targets: HybridMED above random init on every use, above global-only on at least three
def targets(summary: dict[str, Any], reference: dict[str, Any] | None) -> list[str]:
    """Each target, met or missed and by how much, from the table's own means (4 decimals)."""
    d = summary["downstream"]

    def diff(use: str, other: str) -> float | None:
        a, b = d.get(use, {}).get("hybridmed"), d.get(use, {}).get(other)
        return None if a is None or b is None else round(a - b, 4)

    vs_random = {u: diff(u, "random") for u in USES if diff(u, "random") is not None}
    vs_global = {u: diff(u, "global_only") for u in USES if diff(u, "global_only") is not None}
    if not vs_random and not vs_global:
        return []
    below = [f"{u} {v:+.4f}" for u, v in vs_random.items() if v <= 0]
    above = [u for u, v in vs_global.items() if v > 0]
    lines = ["", "## Targets", ""]
    lines.append(
        f"- HybridMED above random init on every use it shares with it ({len(vs_random)}): "
        + ("met." if not below else f"missed on {len(below)}: {', '.join(below)} (HybridMED minus random; a tie or below counts as missed).")
    )
    lines.append(
        f"- HybridMED above global-only on at least three uses: {'met' if len(above) >= 3 else 'missed'} "
        f"({len(above)} of {len(vs_global)}: {', '.join(above) or 'none'})."
    )
    if reference:
        acc = d.get("zeroshot_acc", {})
        best = max((v for v in acc.values() if v is not None), default=None)
        if best is not None:
            lines.append(
                f"- Zero-shot {'below' if best < reference['majority_acc'] else 'above'} the constant guess: the best arm's accuracy {best:.3f} against {reference['majority_acc']:.3f} for always "
                f"answering {reference['majority']}; balanced accuracy is the fairer reading (constant {reference['constant_balanced_acc']:.3f})."
            )
        floor = reference.get("retrieval_floor") or {}
        r1 = max((v for v in d.get("retrieval_r1", {}).values() if v is not None), default=None)
        if r1 is not None and "r1" in floor:
            lines.append(
                f"- Retrieval {'below' if r1 < floor['r1'] else 'above'} the image-blind floor: the best arm's R@1 {r1:.3f} against {floor['r1']:.3f} "
                "for ranking the most common impression first for every image (an identical impression counts as the image's own, and most "
                "held-out impressions are the same few diagnoses)."
            )
    return lines


def render(summary: dict[str, Any], raw: dict[str, Any], settings: dict[str, Any], reference: dict[str, Any] | None = None) -> str:
    seeds = summary["seeds"]
    lines = [
        "# Pretraining benchmark (HybridMED vs random init and simpler objectives)",
        "",
        f"Text encoder: {summary['text_encoder']}."
        + (f" Random-init rows from `{settings['random_from']}` (no text side; the same experts)." if settings.get("random_from") else ""),
        "",
        f"Settings: {json.dumps(settings)}. Held-out: {TEST_FRACTION:.0%} of the COVID-notes patients (never pretrained on). "
        f"Mean over seeds {seeds} (std in brackets where there are several; `[seeds]` where a cell has fewer, e.g. a score added "
        "after a seed's checkpoints were gone); null: the use does not apply to the arm; not scored: the arm's results predate the "
        "use (`--rescore` adds it). `*_bacc_*`: balanced accuracy (mean recall of the three groups).",
        "",
    ]
    if reference:
        lines += [
            f"Floor: always answering {reference['majority']} scores accuracy {reference['majority_acc']:.3f} on the {reference['n']} "
            f"held-out images, and any constant answer balanced accuracy {reference['constant_balanced_acc']:.3f}.",
            "",
        ]
    lines += [
        "| downstream use | " + " | ".join(ARMS) + " |",
        "|---|" + "---|" * len(ARMS),
    ]
    for use in USES:
        cells = []
        for arm in ARMS:
            v, s = summary["downstream"].get(use, {}).get(arm), summary["std_over_seeds"].get(use, {}).get(arm)
            n = summary.get("seeds_counted", {}).get(use, {}).get(arm, seeds)
            few = f" {n}" if v is not None and len(n) < len(seeds) else ""
            older = use in ADDED_LATER and summary["downstream"].get(ADDED_LATER[use], {}).get(arm) is not None
            cells.append(("not scored" if older else "null") if v is None else (f"{v:.3f}" + (f" ({s:.3f})" if s is not None else "") + few))
        lines.append(f"| {use} | " + " | ".join(cells) + " |")
    lines += targets(summary, reference)
    lines += curve_lines(raw)
    lines += ["", "Cost per run:", ""]
    for arm in ARMS:
        for seed, r in sorted(raw.get(arm, {}).items()):
            if "pretrain" in r:
                p = r["pretrain"]
                peak = "peak RSS while it pretrained" if p.get("peak_scope") == "arm" else "the benchmark process's peak RSS by then"
                lines.append(
                    f"- {arm} seed {seed}: {p['steps']} steps ({p.get('summarize_steps') or 0} summarization) in {p['minutes']:.1f} min; {peak} {p['peak_mb']:.0f} MB"
                )
    for arm in ARMS:
        for seed, r in sorted(raw.get(arm, {}).items()):
            for ref, cap in r.get("caption_examples", []):
                lines.append(f"- caption ({arm} s{seed}): reference `{ref}` -> generated `{cap}`")
    return "\n".join(lines) + "\n"


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window (Linux: ``/proc/self/clear_refs``), so each arm's peak is its own
    and not the largest of every arm run before it in this process. False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """The process's peak resident memory since the last :func:`reset_peak_rss` (Linux ``VmHWM``),
    else since it started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    ap.add_argument("--work", type=Path, default=HERE.parent / "runs" / "bench-pretrain")
    ap.add_argument("--budget-minutes", type=float, default=8.0)
    ap.add_argument("--seg-minutes", type=float, default=2.0)
    ap.add_argument(
        "--seg-warmup", type=int, default=0,
        help="the seg experts' linear learning-rate warm-up in steps (every arm alike; DKFZ's fine-tuning trainers warm up a pretrained network before the poly decay)",
    )  # fmt: skip
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--only", nargs="+", choices=ARMS, default=list(ARMS))
    ap.add_argument("--skip-seg", action="store_true")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--rescore", action="store_true", help="score finished pretraining runs again (uses 1-4), keeping their segmentation rows")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where the JSON and markdown go (default benchmarks/results/pretrain)")
    ap.add_argument("--text-encoder", choices=("scratch", "minilm"), default="scratch", help="minilm needs medalloy[text]")
    ap.add_argument(
        "--token-scope",
        choices=("batch", "pair"),
        default="batch",
        help="token-level contrast over the batch's pairs, or within each pair (MGCA; cheaper); use its own --work",
    )
    ap.add_argument("--random-from", type=Path, default=None, help="take the random arm's rows from DIR/raw.json")
    ap.add_argument("--curves", action="store_true", help="with --report: add the seg experts' validation curves from the runs still in --work")
    a = ap.parse_args()
    results = a.results
    raw_path = results / "raw.json"
    raw = json.loads(raw_path.read_text()) if raw_path.exists() else {}
    if a.curves:
        print(f"[curves] {backfill_curves(raw, a.work)} seg runs' validation curves read from {a.work}", flush=True)
        raw_path.write_text(json.dumps(raw, indent=1))
    settings: dict[str, Any] = {"budget_minutes": a.budget_minutes, "seg_minutes": a.seg_minutes, "image_size": IMAGE_SIZE, "cpu_threads": os.cpu_count()}
    if a.seg_warmup:
        settings["seg_warmup_steps"] = a.seg_warmup
    if a.token_scope != "batch":
        settings["token_scope"] = a.token_scope
    if a.random_from is not None:
        src = a.random_from / "raw.json"
        if not src.exists():
            sys.exit(f"error: {src} not found; fix: point --random-from at a results folder of this benchmark")
        raw["random"] = json.loads(src.read_text()).get("random", {})
        settings["random_from"] = str(a.random_from)
    # --report renders without the data; with it, the held-out set gives the constant-guess floor
    prepared = prepare_pairs(a.data, a.work) if not a.report or (a.data / "CXR-Text" / "covid_cxr_notes.csv").exists() else None
    reference = reference_scores(prepared[3]) if prepared else None
    if not a.report:
        import torch

        pairs_csv, columns, train, test = prepared
        print(f"[data] {len(train)} pretraining pairs, {len(test)} held-out ({len({p.patient for p in test})} patients)", flush=True)
        for seed in a.seeds:
            for arm in a.only:
                if arm == "random" and a.random_from is not None:
                    continue  # its rows are the other table's
                t0 = time.perf_counter()
                if a.rescore:
                    row = dict(raw.get(arm, {}).get(str(seed), {}))
                    row.update(score_arm(arm, seed, None if arm == "random" else a.work / "runs" / f"{arm}-s{seed}", train, test))
                    raw.setdefault(arm, {})[str(seed)] = row
                    continue
                own_peak = reset_peak_rss()
                run = None if arm == "random" else pretrain_arm(arm, seed, pairs_csv, columns, a.data, a.work, a.budget_minutes, a.text_encoder, a.token_scope)
                row: dict[str, Any] = {}
                if run is not None:
                    res = json.loads((run / "run.json").read_text())
                    row["text_encoder"] = res["text_encoder"]
                    row["pretrain"] = {
                        "steps": res["steps"], "summarize_steps": (res.get("summarize") or {}).get("steps"),
                        "minutes": round((res["seconds"] + ((res.get("summarize") or {}).get("seconds") or 0)) / 60, 2), "peak_mb": peak_rss_mb(),
                        "peak_scope": "arm" if own_peak else "process",
                    }  # fmt: skip
                torch.set_num_threads(2)
                row.update(score_arm(arm, seed, run, train, test))
                if not a.skip_seg:
                    row.update(seg_arm(arm, seed, run, a.data, a.work, a.seg_minutes, a.seg_warmup))
                row["wall_minutes"] = round((time.perf_counter() - t0) / 60, 2)
                raw.setdefault(arm, {})[str(seed)] = row
                results.mkdir(parents=True, exist_ok=True)
                raw_path.write_text(json.dumps(raw, indent=1))
                print(f"[scores] {arm} seed {seed}: " + ", ".join(f"{k}={v:.3f}" for k, v in row.items() if isinstance(v, float)), flush=True)
        if a.rescore:
            raw_path.write_text(json.dumps(raw, indent=1))
        settings["cpu_threads"] = torch.get_num_threads()
    summary = summarise(raw)
    summary["settings"] = settings
    summary["reference"] = reference
    results.mkdir(parents=True, exist_ok=True)
    (results / "results.json").write_text(json.dumps(summary, indent=1))
    (results / "results.md").write_text(render(summary, raw, settings, reference))
    print((results / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
