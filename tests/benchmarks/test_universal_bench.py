"""benchmarks/universal.py: ``--set`` overrides are read as YAML and checked before any training."""

from __future__ import annotations

import json
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
    (tmp_path / "raw.json").write_text('{"setting": {"budget_per_expert_minutes": 6.0, "seed": 0}}', encoding="utf-8")
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
    # written before the arms recorded it: said so, not guessed from the budget or seed (the 2-minute table's arms differed)
    for budget, seed in ((2.0, 0), (6.0, 1)):
        unrecorded = {"setting": {"budget_per_expert_minutes": budget, "seed": seed}, "2d": {"universal": {"steps": 1}}}
        assert bench.batching(unrecorded) == "batching not recorded by these arms"


def _small_raw() -> dict:
    score = {"lung": {"dice": 0.9, "hd95": 5.0}}
    expert = {"scores": score, "params": 10, "steps": 100, "minutes": 1.0, "seconds_per_case": 0.1}
    universal = {"scores": {n: score for n in bench.MIXES["2d"]}, "params": 12, "steps": 300, "minutes": 5.0, "seconds_per_case": 0.2, "datasets_per_step": 2}
    return {"setting": {"budget_per_expert_minutes": 2.0, "seed": 0}, "2d": {"experts": {n: expert for n in bench.MIXES["2d"]}, "universal": universal}}


def test_the_markdown_links_the_notes_and_carries_none_of_their_text(tmp_path: Path) -> None:
    raw = _small_raw()
    res = bench.summary(raw, 2.0)
    link = "Notes (written by people, not generated): [NOTES.md](NOTES.md)."
    notes = (bench.RESULTS / "NOTES.md").read_text(encoding="utf-8")
    md = bench.markdown(res, raw)  # the study's own folder, whose NOTES.md people write
    assert md.rstrip().endswith(link) and "## Notes" not in md
    bullets = [line[2:] for line in notes.splitlines() if line.startswith("- ")]
    assert bullets and not any(b[:60] in md for b in bullets)
    assert link not in bench.markdown(res, raw, tmp_path)  # a folder without notes gets no dangling link
    (tmp_path / "NOTES.md").write_text("# notes\n", encoding="utf-8")
    assert link in bench.markdown(res, raw, tmp_path)


def test_the_study_writes_its_own_folder(tmp_path: Path) -> None:
    assert bench.RESULTS == Path(bench.__file__).resolve().parent / "results" / "universal"
    assert (bench.RESULTS / "results.json").is_file() and (bench.RESULTS / "raw.json").is_file()  # what amalgamate.py and --report read
    raw = _small_raw()
    (tmp_path / "raw.json").write_text(json.dumps(raw), encoding="utf-8")
    assert bench.main(["--report", "--results", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw.json", "results.json", "results.md"]
    assert json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))["tasks"]["JSRT/lung"] == {"expert": 0.9, "universal": 0.9}
