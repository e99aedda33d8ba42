"""The demo pipeline end to end with a few steps per model (the real demo trains longer)."""

from __future__ import annotations

import json

import pytest

from medalloy.demo import demo_config, run_demo
from medalloy.errors import MedalloyError
from medalloy.pipeline import load_pipeline

pytestmark = pytest.mark.slow
MODEL_STAGES = ["experts", "experts_pretrained", "universal", "amalgamate", "distill", "export"]


def test_the_demo_file_is_a_valid_pipeline_of_every_stage():
    cfg = load_pipeline(demo_config())
    assert {s.kind for s in cfg.stages.values()} == {"pretrain", "experts", "universal", "amalgamate", "distill", "export", "evaluate", "report"}
    quick = demo_config(steps=3)
    assert all(s["train"]["steps"] == 3 for s in quick["stages"].values() if "train" in s)
    assert quick["stages"]["pretrain"]["summarize_steps"] == 3
    assert quick["stages"]["evaluate"]["latency_runs"] == 3 and "latency_runs" not in demo_config()["stages"]["evaluate"]


def test_demo_writes_the_report_with_every_model_on_the_held_out_cases(tmp_path):
    report = run_demo(tmp_path / "demo", steps=3, progress=False)
    text = report.read_text(encoding="utf-8")
    header = next(ln for ln in text.splitlines() if ln.startswith("| dataset | task | source |"))
    assert [c.strip() for c in header.strip("|").split("|")][3:] == MODEL_STAGES
    rows = {
        (c[0], c[1]): c[3:] for c in ([x.strip() for x in ln.strip("|").split("|")] for ln in text.splitlines() if ln.startswith("| Synth")) if c[2] == "all"
    }
    assert set(rows) == {
        ("SynthMR", "core"),
        ("SynthMR", "organ"),
        ("SynthCXR", "lung"),
        ("SynthCXR", "heart"),
        ("SynthCXRLung", "lung"),
        ("SynthEndo", "lesion"),
    }
    # experts and the universal model answer every dataset; the amalgamated model the 2D ones; the student and its ONNX export the chest X-ray one
    for (ds, _), cells in rows.items():
        has = [bool(c) for c in cells]
        assert has[0] and has[2] and has[3] == (ds != "SynthMR") and has[1] == has[4] == has[5] == (ds == "SynthCXR"), (ds, cells)
    report_json = json.loads((tmp_path / "demo" / "report.json").read_text(encoding="utf-8"))
    onnx = [r for r in report_json["rows"] if r["format"] == "onnx"]
    assert len(onnx) == 1 and "onnxruntime fp32" in onnx[0]["latency_ms"]
    assert "zero-shot accuracy" in text and "BLEU-4" in text
    expert = json.loads((tmp_path / "demo" / "experts_pretrained" / "SynthCXR" / "run.json").read_text(encoding="utf-8"))
    assert expert["init"]["method"] == "pretrain"
    # a second demo reuses every stage; --overwrite starts afresh, and only over a pipeline's folder
    again = run_demo(tmp_path / "demo", steps=3, progress=False)
    assert again.read_text(encoding="utf-8") == text
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("keep")
    with pytest.raises(MedalloyError, match="no pipeline.json"):
        run_demo(tmp_path / "other", overwrite=True, steps=3, progress=False)
