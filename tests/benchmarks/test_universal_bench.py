"""benchmarks/universal.py: ``--set`` overrides are read as YAML and checked before any training."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from benchmarks import universal as bench


def test_overrides_are_typed_and_checked() -> None:
    assert bench.parse_overrides(["fusion_scales=1", "fusion_width=null", "task_anchors=false"]) == {
        "fusion_scales": 1,
        "fusion_width": None,
        "task_anchors": False,
    }
    assert bench.parse_overrides([]) == {}
    with pytest.raises(ValueError, match="fusion_scale"):
        bench.parse_overrides(["fusion_scale=1"])  # not a field
    with pytest.raises(ValueError, match="KEY=VALUE"):
        bench.parse_overrides(["fusion_scales"])
    with pytest.raises(ValueError, match=r"^--set fusion_scales=0: .*greater than or equal to 1$"):
        bench.parse_overrides(["fusion_scales=0"])  # the config's own bound, in one line


def test_a_table_made_with_other_settings_is_not_merged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "universal_raw.json").write_text('{"setting": {"budget_per_expert_minutes": 6.0, "seed": 0}}', encoding="utf-8")
    data = tmp_path / "data"
    data.mkdir()
    argv = ["--data", str(data), "--results", str(tmp_path), "--only", "universal", "--set", "fusion_scales=1"]
    assert bench.main(argv) == 1  # one table, one configuration: no training starts
    assert "--set" in capsys.readouterr().err  # the message says which flag to match


def test_every_arm_gets_its_cross_source_column() -> None:
    # the robustness check: each arm scored across sources, not only the experts and the full model
    def arm(cross: float, experts: bool = False) -> dict:
        score = {"lung": {"dice": 0.9, "hd95": 5.0}}
        rows = {"JSRT->Shenzhen/lung": {"dice": cross, "hd95": 9.0}}
        if experts:
            return {**{n: {"scores": score, "params": 10, "steps": 100, "minutes": 1.0, "seconds_per_case": 0.1} for n in bench.MIXES["2d"]}, "cross": rows}
        return {"scores": {n: score for n in bench.MIXES["2d"]}, "params": 12, "steps": 300, "minutes": 5.0, "seconds_per_case": 0.2, "cross": rows}

    raw = {"2d": {"experts": arm(0.70, experts=True), "universal": arm(0.80), "no_priors": arm(0.75), "task_priors_only": arm(0.78)}}
    res = bench.summary(raw, 6.0)
    assert res["cross_source"] == {"JSRT->Shenzhen/lung": {"expert": 0.70, "universal": 0.80, "no_priors": 0.75, "task_priors_only": 0.78}}
    md = bench.markdown(res, raw)
    assert "| train -> test / label | expert | universal | no_priors | task_priors_only |" in md
    assert "| JSRT->Shenzhen/lung | 0.700 | 0.800 | 0.750 | 0.780 |" in md


def test_the_header_says_how_these_arms_batched() -> None:
    arm = {"datasets_per_step": 2, "steps": 10}
    raw = {"setting": {"budget_per_expert_minutes": 6.0, "seed": 0}, "2d": {"experts": {}, "universal": arm}}
    assert bench.batching(raw) == "2 datasets' batches a step"
    raw["3d"] = {"no_priors": {**arm, "datasets_per_step": 1}}
    assert bench.batching(raw) == "one dataset a step or 2 datasets' batches a step (the arms differ)"
    # written before the arms recorded it: the table's known setting, else the default of then
    assert bench.batching({"setting": {"budget_per_expert_minutes": 2.0, "seed": 0}, "2d": {"universal": {"steps": 1}}}) == "one dataset a step"
    assert bench.batching({"setting": {"budget_per_expert_minutes": 6.0, "seed": 1}, "2d": {"universal": {"steps": 1}}}) == "two datasets' batches a step"
