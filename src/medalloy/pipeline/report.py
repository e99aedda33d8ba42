"""The report stage: ``RUN/report.html`` (one self-contained page), ``RUN/report.md`` (readable
without a browser) and ``RUN/report.json`` (every number in it): the held-out table per task and source, the recommended model per dataset, the
time per stage, pretraining's held-out scores, training curves and overlays, and a model card.

The recommendation: "best" is the highest validation Dice on the dataset (never the held-out
cases); the recommended model is the smallest within ``tolerance`` of it, deployed as its ONNX
export where the pipeline made one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medalloy.jsonio import read_json, write_json_atomic, write_text_atomic
from medalloy.pipeline.graph import StagePlan
from medalloy.pipeline.html import markdown_to_html
from medalloy.pipeline.stages import Context


def _results(ctx: Context) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """(held-out rows, cross-source rows, cross-source notes) of the evaluate stages."""
    rows, cross, notes = [], [], []
    for rec in ctx.records.values():
        if rec.get("kind") == "evaluate":
            got = read_json(ctx.root / rec["results"], "results.json", "run the evaluate stage again")
            rows += got["rows"]
            cross += got.get("cross_source", [])
            notes += got.get("cross_source_notes", [])
    return rows, cross, notes


def _fastest(latency: dict[str, float]) -> tuple[str, float] | None:
    return min(latency.items(), key=lambda kv: kv[1]) if latency else None


def recommend(rows: list[dict[str, Any]], tolerance: float, cross: list[dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Per dataset: the best score and the smallest model within ``tolerance`` of it (an ONNX
    export counts as the model it was exported from, and is what gets deployed). The score is the
    stage's leave-one-source-out Dice on the dataset's sources where such rows exist (only stages
    with rows compete; an export has the rows of the stage it exports), else each model's validation Dice."""
    from medalloy.pipeline.cross_source import cross_source_dice

    out = {}
    for d in sorted({r["dataset"] for r in rows}):
        cands = [r for r in rows if r["dataset"] == d and r.get("params")]
        loso = {r["model"]: cross_source_dice(cross or [], r.get("trained_by", r["stage"]), d) for r in cands}
        if any(v is not None for v in loso.values()):
            rule = "leave-one-source-out Dice"
            scored = [(r, loso[r["model"]]) for r in cands if loso[r["model"]] is not None]
        else:
            rule = "validation Dice"
            scored = [(r, r["val_dice"]) for r in cands if r.get("val_dice") is not None]
        if not scored:
            continue
        best, best_score = max(scored, key=lambda rs: rs[1])
        close = [(r, v) for r, v in scored if v >= best_score - tolerance]
        pick, score = min(close, key=lambda rs: (rs[0]["params"], rs[0]["format"] != "onnx", -rs[1]))
        out[d] = {
            "rule": rule, "best": best["model"], "best_score": best_score, "recommended": pick["model"], "score": score,
            "val_dice": pick.get("val_dice"), "params": pick["params"], "format": pick["format"], "tolerance": tolerance,
            "held_out_dice": pick["summary"]["mean"]["dice"]["mean"],
        }  # fmt: skip
    return out


def _cross_table(cross: list[dict[str, Any]], notes: list[str]) -> list[str]:
    lines = [
        "## Sources never trained on (leave one source out)",
        "",
        "Each source scored by models trained without it (its training cases; the held-out cases stay untouched).",
        "",
        "| dataset | source left out | task | stage | model | cases | Dice | HD95 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in cross:
        for label, stats in r["summary"]["classes"].items():
            lines.append(
                f"| {r['dataset']} | {r['source']} | {label} | {r['stage']} | {r['model']} | {r['cases']} | {_fmt(stats['dice']['mean'])} | {_fmt(stats['hd95']['mean'], 1)} |"
            )
    return lines + [""] + [f"- {n}" for n in notes] + [""]


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _held_out_table(rows: list[dict[str, Any]]) -> list[str]:
    """Per dataset, task and source (where a dataset has several): each stage's model's Dice / HD95."""
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    lines = ["| dataset | task | source | " + " | ".join(stages) + " |", "|---|---|---|" + "---|" * len(stages)]
    for d in sorted({r["dataset"] for r in rows}):
        by_stage = {r["stage"]: r for r in rows if r["dataset"] == d}
        first = next(iter(by_stage.values()))
        sources = ["all"] + (sorted(first["summary"].get("per_source") or {}) if len(first["summary"].get("per_source") or {}) > 1 else [])
        for label in first["summary"]["classes"]:
            for source in sources:
                cells = []
                for st in stages:
                    r = by_stage.get(st)
                    summary = None if r is None else (r["summary"] if source == "all" else r["summary"]["per_source"].get(source))
                    stats = None if summary is None else summary["classes"].get(label)
                    cells.append("" if stats is None else f"{_fmt(stats['dice']['mean'])} / {_fmt(stats['hd95']['mean'], 1)}")
                lines.append(f"| {d} | {label} | {source} | " + " | ".join(cells) + " |")
    return lines


def _model_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | dataset | parameters | ms per image (fastest runtime here) | validation Dice |", "|---|---|---|---|---|"]
    for r in rows:
        fast = _fastest(r.get("latency_ms") or {})
        lat = "-" if fast is None else f"{fast[1]:.1f} ({fast[0]})"
        params = "-" if not r.get("params") else f"{r['params']:,}"
        lines.append(f"| {r['model']} | {r['dataset']} | {params} | {lat} | {_fmt(r.get('val_dice'))} |")
    return lines


def _stage_table(ctx: Context) -> list[str]:
    lines = ["| stage | kind | minutes | note |", "|---|---|---|---|"]
    for name, rec in ctx.records.items():
        secs = rec.get("seconds")
        lines.append(f"| {name} | {rec.get('kind')} | {'-' if secs is None else f'{secs / 60:.1f}'} | {rec.get('note', '')} |")
    return lines


def _licences(ctx: Context) -> list[str]:
    out = []
    for name, ds in ctx.datasets.items():
        raw = ds.raw
        licence = raw.spec.extension.get("licence") or getattr(raw.spec, "licence", None) or _json_field(ds.path / "dataset.json", ("licence", "license"))
        out.append(f"- {name} (`{raw.name}`): {len(raw.cases)} cases, sources {', '.join(raw.sources)}; licence: {licence or 'not stated in dataset.json'}")
    return out


def _json_field(path: Path, keys: tuple[str, ...]) -> str | None:
    raw = read_json(path, "dataset.json", "")
    return next((str(raw[k]) for k in keys if k in raw), None)


def _figures(ctx: Context, rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for rec in ctx.records.values():
        for m in rec.get("models", []):
            curve = ctx.path(m) / "training_curve.png"
            if m.get("format") == "run" and curve.is_file():
                lines += [f"### {m['name']}: training curve", "", f"![{m['name']} training curve]({curve.relative_to(ctx.root).as_posix()})", ""]
    for r in sorted(rows, key=lambda r: (r["dataset"], r["model"])):
        pngs = sorted((ctx.root / r["folder"]).glob("overlay_*.png"))
        if pngs:
            lines += [f"### {r['model']} on {r['dataset']}: best, median, worst held-out cases", ""]
            lines += [f"![{p.stem}]({p.relative_to(ctx.root).as_posix()})" for p in pngs] + [""]
    return lines


def _pretrain_lines(ctx: Context) -> list[str]:
    lines = []
    for name, rec in ctx.records.items():
        h = rec.get("held_out")
        if rec.get("kind") != "pretrain" or not h:
            continue
        lines += [
            f"## Image-report pretraining ({name})",
            "",
            f"On {h['held_out']} held-out radiographs: zero-shot accuracy over {len(h['classes'])} findings {h['zeroshot_acc']:.3f} "
            f"(chance {1 / len(h['classes']):.3f}); generated impressions BLEU-4 {h['bleu4']:.3f}, ROUGE-L {h['rougeL']:.3f}.",
            "",
            "| reference impression | generated |",
            "|---|---|",
            *[f"| {ref} | {gen} |" for ref, gen in h["captions"]],
            "",
        ]
    return lines


def run_report(ctx: Context, p: StagePlan) -> dict[str, Any]:
    st = p.stage
    rows, cross, notes = _results(ctx)
    rec = recommend(rows, st.tolerance, cross)  # type: ignore[attr-defined]
    lines = [f"# medalloy pipeline report: {ctx.cfg.name}", "", "## Held-out cases", ""]
    if rows:
        lines += [
            "Dice / HD95 on each dataset's held-out cases (its `imagesTs`, or the share the pipeline held out), by the model of each stage.",
            "",
            *_held_out_table(rows),
            "",
            "## Models",
            "",
            *_model_table(rows),
        ]
    else:
        lines.append("No evaluate stage ran, or no dataset has held-out labels (imagesTs + labelsTs).")
    lines += ["", "## Recommended model per dataset", ""]
    if rec:
        lines += [
            "Best: the highest leave-one-source-out Dice where those rows exist, else the highest validation Dice (never the held-out "
            f"cases). Recommended: the smallest model within {st.tolerance:.3f} of it.",  # type: ignore[attr-defined]
            "",
            "| dataset | by | best | recommended | its score | held-out Dice | parameters | deploy |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for d, r in rec.items():
            lines.append(
                f"| {d} | {r['rule']} | {r['best']} ({r['best_score']:.3f}) | {r['recommended']} | {r['score']:.3f} | {r['held_out_dice']:.3f} | "
                f"{r['params']:,} | `{_deployable(ctx, r['recommended'])}` |"
            )
    else:
        lines.append("No model with a validation Dice was evaluated.")
    if cross or notes:
        lines += ["", *_cross_table(cross, notes)]
    lines += ["", "## Stages", "", *_stage_table(ctx), ""]
    lines += _pretrain_lines(ctx)
    lines += [
        "## Model card",
        "",
        "Intended use: research only; not a medical device. Trained on:",
        "",
        *_licences(ctx),
        "",
        "Known limits: the scores above are on each dataset's own held-out cases; images from a site, scanner or protocol "
        "none of these datasets holds may score lower.",
        "",
        "## Figures",
        "",
        *_figures(ctx, rows),
    ]
    text = "\n".join(lines).rstrip() + "\n"
    write_text_atomic(ctx.root / "report.md", text)
    write_text_atomic(ctx.root / "report.html", markdown_to_html(text, ctx.root, f"medalloy report: {ctx.cfg.name}"))
    stages = {
        n: {k: r.get(k) for k in ("kind", "key", "seconds", "note", "models", "held_out", "teacher") if r.get(k) is not None} for n, r in ctx.records.items()
    }
    write_json_atomic(ctx.root / "report.json", {"name": ctx.cfg.name, "rows": rows, "cross_source": cross, "recommendation": rec, "stages": stages})
    return {"models": [], "report": "report.md", "note": "report.html, report.md, report.json", "recommendation": rec}


def _deployable(ctx: Context, model: str) -> str:
    for rec in ctx.records.values():
        for m in rec.get("models", []):
            if m["name"] == model:
                return m["path"]
    return model
