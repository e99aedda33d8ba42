"""The demo pipeline end to end with a few steps per model (the real demo trains longer)."""

from __future__ import annotations

import json

import pytest

from medalloy.demo import run_demo
from medalloy.errors import MedalloyError

pytestmark = pytest.mark.slow


def test_demo_writes_the_report_with_experts_and_the_universal_model(tmp_path):
    report = run_demo(tmp_path / "demo", steps=3, progress=False)
    text = report.read_text(encoding="utf-8")
    for name in ("SynthMR", "SynthCXR", "SynthCXRLung", "SynthEndo"):
        assert f"| {name} |" in text
        assert (tmp_path / "demo" / "predictions-universal" / name).is_dir()
    assert "## Universal model (Hermes) vs experts" in text
    # every expert label has a universal Dice beside it
    uni_rows = [ln for ln in text.split("## Universal model")[1].split("\n## ")[0].splitlines() if ln.startswith("| Synth")]
    assert len(uni_rows) == 6 and all(ln.split("|")[4].strip() not in ("", "-") for ln in uni_rows)
    # the distilled student: predicted through ONNX Runtime, a Dice per teacher label and three latencies
    assert (tmp_path / "demo" / "student" / "student.onnx").is_file() and (tmp_path / "demo" / "predictions-student" / "SynthCXR").is_dir()
    section = text.split("## Distilled student")[1].split("\n## ")[0]
    dice_rows = [ln for ln in section.splitlines() if ln.startswith(("| lung", "| heart"))]
    assert len(dice_rows) == 2 and all(0.0 <= float(ln.split("|")[3]) <= 1.0 for ln in dice_rows)
    assert len([ln for ln in section.splitlines() if ln.startswith(("| teacher", "| student"))]) == 3
    # the amalgamated model of the three 2D experts: a Dice beside each of their labels
    section = text.split("## Amalgamated model (KA2ER) vs experts")[1].split("\n## ")[0]
    ka_rows = [ln for ln in section.splitlines() if ln.startswith("| Synth")]
    assert [ln.split("|")[1].strip() for ln in ka_rows] == ["SynthCXR", "SynthCXR", "SynthCXRLung", "SynthEndo"]
    assert all(0.0 <= float(ln.split("|")[4]) <= 1.0 for ln in ka_rows)
    # pretraining: zero-shot and captions on held-out pairs, and the X-ray expert again from its encoder
    section = text.split("## Image-report pretraining (HybridMED)")[1].split("\n## ")[0]
    assert "zero-shot accuracy" in section and "BLEU-4" in section
    init_rows = [ln for ln in section.splitlines() if ln.startswith(("| lung", "| heart"))]
    assert len(init_rows) == 2 and all(0.0 <= float(ln.split("|")[3]) <= 1.0 for ln in init_rows)
    expert = json.loads((tmp_path / "demo" / "experts-pretrained" / "SynthCXR" / "run.json").read_text(encoding="utf-8"))
    assert expert["init"]["method"] == "pretrain"
    assert json.loads((tmp_path / "demo" / "demo.json").read_text(encoding="utf-8"))["status"] == "done"
    with pytest.raises(MedalloyError, match="overwrite"):
        run_demo(tmp_path / "demo", steps=3, progress=False)
