"""The pretrain stage: HybridMED on image-report pairs (a CSV, or the built-in synthetic ones), then
zero-shot accuracy and generated impressions on held-out pairs where there are some."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medalloy.pipeline.config import PretrainPairs
from medalloy.pipeline.graph import StagePlan
from medalloy.pipeline.stages import Context, train_run

SYNTHETIC_TEST_SEED = 1000  # held-out synthetic pairs: the pipeline's seed + this


def _pairs(ctx: Context, p: StagePlan) -> tuple[Path, Path | None, Path | None]:
    """(pairs CSV, text-only CSV, held-out pairs CSV)."""
    from medalloy.data.synth_reports import generate_report_pairs

    st = p.stage
    if not isinstance(st.pairs, PretrainPairs):  # type: ignore[attr-defined]
        return st.pairs, st.text_only, st.test_pairs  # type: ignore[attr-defined]
    s, size, seed = st.pairs, st.image_size, ctx.cfg.seed  # type: ignore[attr-defined]
    data = ctx.root / p.name / "data"
    made = generate_report_pairs(data / "train", n_cases=s.cases, size=size, seed=seed, text_only=s.text_only, overwrite=True, progress=ctx.progress)
    test = None
    if s.test_cases:
        test = generate_report_pairs(
            data / "test", n_cases=s.test_cases, text_only=0, size=size, seed=seed + SYNTHETIC_TEST_SEED, overwrite=True, progress=ctx.progress
        )
    return made / "pairs.csv", (made / "reports.csv") if s.text_only else None, None if test is None else test / "pairs.csv"


def held_out_scores(run: Path, test_pairs: Path, size: int, classes: list[str] | None = None, label_column: str = "finding") -> dict[str, Any]:
    """Zero-shot accuracy over ``classes`` (default: the held-out pairs' findings) and the
    generated impressions' scores."""
    import numpy as np

    from medalloy.data.reports import ReportColumns, read_report_pairs
    from medalloy.engine.metrics import caption_scores
    from medalloy.engine.radiograph_encoding import encode_images
    from medalloy.models.image_text import encode_texts, generate_impressions, zero_shot_probs
    from medalloy.recipes.pretrain import load_pretrained

    model, enc_tok, dec_tok, record = load_pretrained(run)
    test = read_report_pairs(test_pairs, ReportColumns(label=label_column)).pairs
    classes = classes or sorted({p.label for p in test})
    emb, patches = encode_images(model, [p.image for p in test], size)
    probs = zero_shot_probs(emb, encode_texts(model, enc_tok, classes, record["spec"]["max_impression_len"]), record["temperature"])
    zeroshot = float(np.mean([classes[int(i)] == p.label for i, p in zip(probs.argmax(1), test)]))
    captions = generate_impressions(model, dec_tok, patches)
    return {
        "held_out": len(test),
        "classes": classes,
        "zeroshot_acc": zeroshot,
        **caption_scores(captions, [p.impression for p in test]),
        "captions": [[p.impression, c] for p, c in zip(test, captions)][:4],
    }


def run_pretrain(ctx: Context, p: StagePlan) -> dict[str, Any]:
    from medalloy.engine.distributed import current, from_main
    from medalloy.recipes.pretrain import pretrain

    pairs, text_only, test_pairs = from_main(lambda: _pairs(ctx, p), current())  # rank 0 writes the synthetic pairs
    cfg = ctx.recipe_config(p, p.budget)
    folder = ctx.root / p.name / "run"
    summary = train_run(
        folder, lambda resume, overwrite: pretrain(pairs, folder, text_only=text_only, config=cfg, resume=resume, overwrite=overwrite, progress=ctx.progress)
    )
    model = {
        "name": f"{p.name}/run", "stage": p.name, "path": f"{p.name}/run", "format": "pretrain", "datasets": [],
        "params": summary.get("params"), "seconds": summary.get("seconds"), "steps": summary.get("steps"),
    }  # fmt: skip
    record: dict[str, Any] = {"models": [model], "summary": {k: summary.get(k) for k in ("train_pairs", "text_only_pairs", "seconds", "summarize", "best")}}
    if test_pairs is not None:
        ctx.log(f"{p.name}: zero-shot accuracy and impressions on the held-out pairs")
        from medalloy.data.synth_reports import CLASSES

        classes = list(CLASSES) if isinstance(p.stage.pairs, PretrainPairs) else None  # type: ignore[attr-defined]
        record["held_out"] = from_main(lambda: held_out_scores(folder, test_pairs, p.stage.image_size, classes), current())  # type: ignore[attr-defined]
        h = record["held_out"]
        record["note"] = f"held-out zero-shot accuracy {h['zeroshot_acc']:.3f}, BLEU-4 {h['bleu4']:.3f}"
    return record
