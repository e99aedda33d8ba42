"""benchmarks/pretrain.py: the summary's means, spread, seeds counted and text encoder."""

from __future__ import annotations

import json

import pytest

from benchmarks import pretrain as bench


def test_summary_means_seeds_and_text_encoder() -> None:
    raw = {
        "random": {"0": {"linear_probe_acc_1": 0.5}, "1": {"linear_probe_acc_1": 0.7}},
        "global_only": {"0": {"text_encoder": "minilm", "zeroshot_acc": 0.2}, "1": {"text_encoder": "minilm", "zeroshot_acc": 0.4}},
        "hybridmed": {"1": {"text_encoder": "minilm", "zeroshot_acc": 0.3, "caption_bleu4": 0.1}},
    }
    s = bench.summarise(raw)
    assert s["text_encoder"] == "minilm"  # the random arm (no text side) does not count
    assert s["downstream"]["linear_probe_acc_1"]["random"] == pytest.approx(0.6)
    assert s["std_over_seeds"]["linear_probe_acc_1"]["random"] == pytest.approx(0.1)
    assert s["downstream"]["zeroshot_acc"]["global_only"] == pytest.approx(0.3)
    assert s["seeds_counted"]["zeroshot_acc"]["hybridmed"] == [1]
    assert s["std_over_seeds"]["zeroshot_acc"]["hybridmed"] is None  # one seed: no spread
    assert s["downstream"]["caption_bleu4"]["global_only"] is None
    assert s["seeds"] == [0, 1]
    md = bench.render(s, raw, {"budget_minutes": 8.0, "random_from": "benchmarks/results"})
    assert "Text encoder: minilm. Random-init rows from `benchmarks/results`" in md
    assert "| zeroshot_acc | null | 0.300 (0.100) | null | 0.300 [1] |" in md


def test_rows_from_before_the_flag_are_scratch() -> None:
    raw = {"global_only": {"0": {"zeroshot_acc": 0.2}}, "token_level": {"0": {"text_encoder": "minilm"}}}
    assert bench.text_encoders({"global_only": raw["global_only"]}) == "scratch"
    assert bench.text_encoders(raw) == "minilm+scratch"  # a mixed table says so


def test_seg_validation_curves_are_read_from_the_runs_and_averaged_per_arm(tmp_path) -> None:
    def write(run: str, values: dict[int, float]) -> None:
        d = tmp_path / "runs" / "seg" / run
        d.mkdir(parents=True)
        rows = [{"kind": "train", "step": 10, "loss": 1.0}] + [{"kind": "val", "step": s, "val/dice": v} for s, v in values.items()]
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    write("random-s1-JSRT-10", {200: 0.90, 400: 0.94})
    write("random-s1-Shenzhen-10", {200: 0.80, 400: 0.92})
    raw = {"random": {"1": {"JSRT_10": {"dice": 0.95}, "Shenzhen_10": {"dice": 0.94}, "JSRT_100": {"dice": 0.96}, "seg_dice_10": 0.945}}}
    assert bench.backfill_curves(raw, tmp_path) == 2  # JSRT_100's run is gone: no curve, no error
    assert raw["random"]["1"]["JSRT_10"]["val_curve"] == {"200": 0.9, "400": 0.94} and "val_curve" not in raw["random"]["1"]["JSRT_100"]
    assert bench.backfill_curves(raw, tmp_path) == 0  # already there
    assert "| random | 10 % | 0.850 | 0.930 |  | 1 |" in bench.curve_lines(raw)
    assert bench.curve_lines({"random": {"1": {"JSRT_10": {"dice": 0.9}}}}) == []


def test_retrieval_r10_is_reported_and_older_results_without_it_still_render() -> None:
    assert bench.USES.index("retrieval_r10") == bench.USES.index("retrieval_r5") + 1
    raw = {
        "random": {"0": {"linear_probe_acc_1": 0.5}},
        "global_only": {"0": {"retrieval_r1": 0.1, "retrieval_r5": 0.3}, "1": {"retrieval_r1": 0.2, "retrieval_r5": 0.4, "retrieval_r10": 0.6}},
        "hybridmed": {"0": {"retrieval_r1": 0.1, "retrieval_r5": 0.2}},  # scored before R@10 was added
    }
    s = bench.summarise(raw)
    assert s["downstream"]["retrieval_r10"] == {"random": None, "global_only": 0.6, "token_level": None, "hybridmed": None}
    assert s["seeds_counted"]["retrieval_r10"]["global_only"] == [1] and s["std_over_seeds"]["retrieval_r10"]["global_only"] is None
    json.dumps(s)  # the summary stays JSON (null where absent)
    md = bench.render(s, raw, {})
    # random init has no text side (null); hybridmed's rows predate R@10 (not scored); one of global-only's two seeds has it
    assert "| retrieval_r10 | null | 0.600 [1] | null | not scored |" in md
    assert "| retrieval_r5 | null | 0.350 (0.050) | null | 0.200 [0] |" in md


def test_cost_per_arm_means_minutes_keeps_the_largest_peak_and_its_scope() -> None:
    def pre(minutes: float, steps: int, peak: float, scope: str | None, summarize: int | None = None) -> dict:
        p = {"steps": steps, "summarize_steps": summarize, "minutes": minutes, "peak_mb": peak}
        return {"pretrain": p if scope is None else {**p, "peak_scope": scope}}

    raw = {
        "random": {"0": {"linear_probe_acc_1": 0.5}},  # nothing pretrained: no cost row
        "global_only": {"0": pre(7.0, 100, 900.0, None), "1": pre(8.0, 120, 1200.0, None)},
        "hybridmed": {"0": pre(8.0, 30, 3000.0, "arm", 20), "1": pre(7.8, 34, 2500.0, "arm", 24)},
    }
    c = bench.summarise(raw)["cost"]
    assert set(c) == {"global_only", "hybridmed"}
    assert c["global_only"] == {"pretrain_minutes": 7.5, "steps": 110.0, "summarize_steps": 0.0, "peak_mb": 1200, "peak_scope": "process", "seeds": 2}
    assert c["hybridmed"]["peak_mb"] == 3000 and c["hybridmed"]["peak_scope"] == "arm" and c["hybridmed"]["summarize_steps"] == 22.0
    md = bench.render(bench.summarise(raw), raw, {})
    assert "- hybridmed seed 0: 30 steps (20 summarization) in 8.0 min; peak RSS while it pretrained 3000 MB" in md
    assert "- global_only seed 1: 120 steps (0 summarization) in 8.0 min; the benchmark process's peak RSS by then 1200 MB" in md


def test_the_peak_window_restarts_where_linux_allows() -> None:
    if not bench.reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs here")
    import numpy as np

    big = np.ones(40_000_000)  # ~305 MB resident
    high = bench.peak_rss_mb()
    del big
    assert bench.reset_peak_rss()
    assert bench.peak_rss_mb() < high - 200  # the 305 MB block no longer counts


def test_targets_say_which_are_missed_and_the_image_blind_floors() -> None:
    from types import SimpleNamespace

    test = [SimpleNamespace(impression=t) for t in ["COVID-19", "COVID-19  ", "COVID-19", "No Finding", "SARS"]]
    ref = bench.reference_scores(test)
    # "covid-19" (3 of 5) first, then the rest by name: "no finding", "sars"
    assert ref["retrieval_floor"] == {"r1": 0.6, "r5": 1.0, "r10": 1.0} and ref["majority_acc"] == 0.6
    raw = {
        "random": {"0": {"linear_probe_acc_1": 0.70, "seg_dice_100": 0.9654}},
        "global_only": {"0": {"linear_probe_acc_1": 0.60, "zeroshot_acc": 0.2, "retrieval_r1": 0.1, "seg_dice_100": 0.96}},
        "hybridmed": {"0": {"linear_probe_acc_1": 0.65, "zeroshot_acc": 0.3, "retrieval_r1": 0.7, "seg_dice_100": 0.9647}},
    }
    lines = "\n".join(bench.targets(bench.summarise(raw), ref))
    assert "missed on 2: linear_probe_acc_1 -0.0500, seg_dice_100 -0.0007" in lines  # not a tie at 4 decimals
    assert "above global-only on at least three uses: missed (4 of 4" not in lines and "met (4 of 4" in lines
    assert "Zero-shot below the constant guess: the best arm's accuracy 0.300 against 0.600" in lines
    assert "Retrieval above the image-blind floor: the best arm's R@1 0.700 against 0.600" in lines


def test_the_committed_markdown_is_what_the_script_renders_from_the_committed_json() -> None:
    assert bench.RESULTS.parts[-2:] == ("results", "pretrain")
    summary = json.loads((bench.RESULTS / "results.json").read_text())
    raw = json.loads((bench.RESULTS / "raw.json").read_text())
    assert bench.render(summary, raw, summary["settings"], summary["reference"]) == (bench.RESULTS / "results.md").read_text()
