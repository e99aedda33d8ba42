"""Step times for the budget planner: measured once per machine and step shape, then read from the
cache; `medalloy plan --budget-minutes` writes the choice and its reasons into plan.json."""

from __future__ import annotations

import json

from medalloy.cli import main
from medalloy.data.synth import generate_dataset
from medalloy.planning.plan import load_plan
from medalloy.planning.planner import plan_images_2d
from medalloy.recipes.step_timing import measure_step_seconds, step_seconds


def _plan(size: int = 32):
    return plan_images_2d(size).model_copy(update={"label_values": [0, 1], "labels": {"background": 0, "organ": 1}})


def test_a_step_is_measured_once_per_shape_and_then_read_from_the_cache(tmp_path):
    calls = []

    def fake(plan, device):
        calls.append(plan.patch_size)
        return 0.01 * plan.patch_size[0]

    seconds = step_seconds("cpu", cache=tmp_path / "times.json", measure=fake)
    assert seconds(_plan(32)) == 0.32 and seconds(_plan(32)) == 0.32
    assert seconds(_plan(64)) == 0.64
    assert calls == [[32, 32], [64, 64]]  # the second 32 px step came from the cache
    again = step_seconds("cpu", cache=tmp_path / "times.json", measure=fake)  # another process, the same machine
    assert again(_plan(64)) == 0.64 and len(calls) == 2
    (tmp_path / "times.json").write_text("not json", encoding="utf-8")
    assert seconds(_plan(32)) == 0.32 and len(calls) == 3  # an unreadable cache is measured afresh


def test_a_measured_step_is_a_positive_time_that_grows_with_the_patch():
    small, large = measure_step_seconds(_plan(32), steps=1), measure_step_seconds(_plan(96), steps=1)  # 4.5x the pixels a step
    assert 0 < small < large


def test_plan_with_a_budget_writes_its_reasons(tmp_path, monkeypatch, capsys):
    import medalloy.recipes.step_timing as timing

    monkeypatch.setenv("MEDALLOY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(timing, "measure_step_seconds", lambda plan, device: 1e-8 * plan.batch_size * plan.patch_size[0] ** 2 * plan.network.filters[0] ** 2)
    ds = generate_dataset("Dataset902_SynthCXR", tmp_path, seed=0, cases_per_source=3, test_cases_per_source=0, progress=False)
    out = tmp_path / "plan.json"
    assert main(["-q", "plan", str(ds), "--out", str(out), "--budget-minutes", "0.2", "--device", "cpu"]) == 0
    plan = load_plan(out)
    assert plan.budget is not None and plan.budget.minutes == 0.2 and plan.budget.candidates[0].name == "full resolution"
    assert plan.budget.chosen in capsys.readouterr().out and "cores" in plan.budget.machine
    assert len(json.loads((tmp_path / "cache" / "step_times.json").read_text(encoding="utf-8"))) == len(plan.budget.candidates)
    assert main(["-q", "plan", str(ds), "--out", str(tmp_path / "own" / "plan.json")]) == 0
    assert load_plan(tmp_path / "own" / "plan.json").budget is None  # without a budget, the planner's rules alone
