"""The pipeline's plan without training: stage kinds, order, budgets, keys, the recommendation rule."""

from __future__ import annotations

import pytest

from medalloy.errors import MedalloyError
from medalloy.pipeline import json_schema, load_pipeline
from medalloy.pipeline.config import budget_minutes, recipe_config
from medalloy.pipeline.datasets import ResolvedDataset
from medalloy.pipeline.graph import plan_stages, select, what_changed
from medalloy.pipeline.report import recommend
from medalloy.pipeline.stages import Context, best_teacher


def _cfg(**stages) -> dict:
    return {"datasets": {"a": {"synthetic": {"name": "SynthCXR"}}, "b": {"synthetic": {"name": "SynthEndo"}}}, "stages": stages}


def _plan(cfg: dict, keys: dict[str, str] | None = None):
    keys = keys or {"a": "ka", "b": "kb"}
    datasets = {n: ResolvedDataset(n, None, keys[n]) for n in ("a", "b")}  # type: ignore[arg-type]
    return {p.name: p for p in plan_stages(load_pipeline(cfg), datasets)}


def test_a_stage_runs_after_what_it_reads_else_in_the_files_order():
    cfg = _cfg(
        report={}, distill={"teacher": "universal"}, universal={}, experts_again={"kind": "experts", "init": "pretrain"},
        pretrain={"pairs": {"cases": 4}}, experts={},
    )  # fmt: skip
    assert list(_plan(cfg)) == ["universal", "distill", "pretrain", "experts_again", "experts", "report"]
    in_order = _cfg(pretrain={"pairs": {"cases": 4}}, experts={}, universal={}, experts_again={"kind": "experts", "init": "pretrain"}, report={})
    assert list(_plan(in_order)) == ["pretrain", "experts", "universal", "experts_again", "report"]  # the file's order where it can


def test_a_settings_change_changes_the_key_of_that_stage_and_the_stages_below_only():
    base = _cfg(experts={}, universal={}, distill={"teacher": "experts"}, export={}, report={})
    a = _plan(base)
    b = _plan(_cfg(experts={}, universal={}, distill={"teacher": "experts", "train": {"steps": 7}}, export={}, report={}))
    assert [n for n in a if a[n].key != b[n].key] == ["distill", "export", "report"]
    assert what_changed({"settings": a["distill"].settings_key, "datasets": a["distill"].dataset_keys}, b["distill"]) == "its settings changed"
    old = {"settings": a["export"].settings_key, "datasets": {}, "stages": a["export"].upstream, "external": {}}
    assert what_changed(old, b["export"]) == "it reads distill, which runs again"
    c = _plan(base, {"a": "ka", "b": "changed"})
    assert [n for n in a if a[n].key != c[n].key] == ["experts", "universal", "distill", "export", "report"]
    assert what_changed({"settings": a["experts"].settings_key, "datasets": a["experts"].dataset_keys}, c["experts"]) == "dataset b changed since it ran"
    # the pipeline's seed is every stage's, so it is in every key; the device is not a result's
    d = _plan({**base, "seed": 1})
    assert all(a[n].key != d[n].key for n in a)
    e = _plan({**base, "device": "cuda"})
    assert all(a[n].key == e[n].key for n in a)


def test_the_budget_is_split_by_shares_after_the_stages_own():
    p = _plan({**_cfg(experts={"share": 3}, universal={"share": 1}, distill={"teacher": "experts", "budget": "20m"}, report={}), "budget": "1.5h"})
    assert p["distill"].budget == 20
    assert p["experts"].budget == pytest.approx(52.5) and p["universal"].budget == pytest.approx(17.5)
    assert p["report"].budget is None
    q = _plan({**_cfg(experts={}, universal={}), "budget": 60})  # default shares 0.35 : 0.25
    assert q["experts"].budget == pytest.approx(35) and q["universal"].budget == pytest.approx(25)
    with pytest.raises(MedalloyError, match="take all of the pipeline"):
        _plan({**_cfg(experts={"budget": "2h"}, universal={}), "budget": "1h"})
    assert [budget_minutes(v) for v in ("90m", "1.5h", "30s", 12)] == [90, 90, 0.5, 12]
    with pytest.raises(MedalloyError, match="not a duration"):
        load_pipeline({**_cfg(experts={}), "budget": "soon"})


def test_a_stage_budget_reaches_its_recipe_and_the_pipeline_seed_fills_an_unset_one():
    cfg = load_pipeline({**_cfg(experts={"train": {"steps": 9}}, universal={"train": {"seed": 5}}), "seed": 3, "device": "cpu"})
    experts = recipe_config(cfg.stages["experts"], cfg.seed, cfg.device, 4.0)
    assert (experts.train.steps, experts.train.seed, experts.train.device, experts.train.time_budget_minutes) == (9, 3, "cpu", 4.0)
    assert experts.train.val_every == 100  # a partial train section keeps the method's own defaults
    universal = recipe_config(cfg.stages["universal"], cfg.seed, cfg.device, None)
    assert (universal.train.seed, universal.train.steps, universal.train.time_budget_minutes) == (5, 2000, None)


def test_until_and_only_choose_the_stages():
    order = list(_plan(_cfg(experts={}, universal={}, report={})).values())
    assert select(order, "universal", None) == {"experts", "universal"}
    assert select(order, None, ["report"]) == {"report"}
    with pytest.raises(MedalloyError, match="--until nope: no such stage"):
        select(order, "nope", None)


def test_wrong_wiring_is_refused_in_one_line():
    with pytest.raises(MedalloyError, match="stage 'foo' needs a kind"):
        load_pipeline(_cfg(foo={}))
    with pytest.raises(MedalloyError, match="names dataset 'c'"):
        _plan(_cfg(experts={"datasets": ["c"]}))
    with pytest.raises(MedalloyError, match="reads 'universal', a universal stage"):
        _plan(_cfg(universal={}, amalgamate={"experts": ["universal"]}))
    with pytest.raises(MedalloyError, match="give exactly one of path, import, synthetic"):
        load_pipeline({"datasets": {"a": {}}, "stages": {"experts": {}}})


def test_the_schema_names_every_stage_kind_and_refuses_unknown_keys():
    schema = json_schema()
    kinds = {d["properties"]["kind"]["const"] for d in schema["$defs"].values() if "kind" in d.get("properties", {}) and "const" in d["properties"]["kind"]}
    assert kinds == {"pretrain", "experts", "universal", "amalgamate", "distill", "export", "evaluate", "report"}
    assert schema["additionalProperties"] is False
    assert schema["$defs"]["ExpertsStage"]["additionalProperties"] is False


def _row(model: str, params: int, val: float, fmt: str = "run") -> dict:
    return {
        "model": model,
        "stage": model.split("/")[0],
        "dataset": "d",
        "params": params,
        "val_dice": val,
        "format": fmt,
        "summary": {"mean": {"dice": {"mean": val - 0.01}}},
    }


def test_the_recommendation_is_the_smallest_model_within_the_tolerance_of_the_best():
    rows = [_row("experts/d", 2_000_000, 0.90), _row("universal", 3_000_000, 0.92), _row("distill/d", 300_000, 0.895)]
    rec = recommend(rows, 0.03)["d"]
    assert (rec["best"], rec["recommended"], rec["rule"]) == ("universal", "distill/d", "validation Dice")
    assert recommend(rows, 0.02)["d"]["recommended"] == "experts/d"
    assert recommend(rows, 0.0)["d"]["recommended"] == "universal"
    onnx = recommend([*rows, _row("export/distill-d", 300_000, 0.895, "onnx")], 0.03)["d"]
    assert onnx["recommended"] == "export/distill-d"  # the same model, deployable without torch


def test_the_best_teacher_is_the_stage_with_the_highest_validation_dice_on_the_students_datasets():
    records = {
        "experts": {"models": [{"datasets": ["a"], "val_dice": {"a": 0.8}}, {"datasets": ["b"], "val_dice": {"b": 0.9}}]},
        "universal": {"models": [{"datasets": ["a", "b"], "val_dice": {"a": 0.85, "b": 0.7}}]},
        "amalgamate": {"models": [{"datasets": ["a"], "val_dice": {"a": 0.99}}]},
    }
    ctx = Context(None, None, {}, records, False)  # type: ignore[arg-type]
    assert best_teacher(ctx, ["experts", "universal", "amalgamate"], ["a"]) == "amalgamate"
    assert best_teacher(ctx, ["experts", "universal", "amalgamate"], ["a", "b"]) == "experts"  # amalgamate lacks b
    assert best_teacher(ctx, ["experts", "universal"], ["b"]) == "experts"


def test_a_dataset_without_test_labels_holds_out_a_share_by_patient(tmp_path):
    from medalloy.data.dataset import RawDataset
    from medalloy.data.synth import generate_dataset
    from medalloy.pipeline.datasets import resolve_datasets

    path = generate_dataset("SynthCXR", tmp_path, cases_per_source=5, test_cases_per_source=0, progress=False)
    cfg = load_pipeline({"datasets": {"a": {"path": str(path)}, "b": {"path": str(path), "held_out": 0.5}}, "stages": {"experts": {}}})
    dss = resolve_datasets(cfg.datasets, tmp_path / "data", build=False, progress=False, held_out=cfg.held_out)
    a, b = dss["a"].split(), dss["b"].split()
    ids = sorted(c.case_id for c in RawDataset(path).labelled_cases())
    for split, n_test in ((a, 2), (b, 5)):
        assert sorted(split["train"] + split["val"] + split["test"]) == ids and len(split["test"]) == n_test
        assert not set(split["test"]) & set(split["train"] + split["val"]) and split["val"]
    assert dss["a"].split() == a  # the same cases every time
    assert dss["a"].key != dss["b"].key  # the share is part of the dataset's key
    with_test = generate_dataset("SynthEndo", tmp_path, cases_per_source=3, test_cases_per_source=1, progress=False)
    own = resolve_datasets(load_pipeline({"datasets": {"c": {"path": str(with_test)}}, "stages": {"experts": {}}}).datasets, tmp_path, False, False)
    assert own["c"].split() is None  # its own imagesTs + labelsTs are the held-out cases


def test_where_leave_one_source_out_rows_exist_they_decide_and_only_stages_with_rows_compete():
    rows = [_row("experts/d", 2_000_000, 0.95), _row("universal", 3_000_000, 0.90), _row("distill/d", 300_000, 0.94)]
    for r, stage in zip(rows, ("experts", "universal", "distill")):
        r["stage"] = stage
    cross = [{"stage": "experts", "dataset": "d", "summary": {"mean": {"dice": {"mean": 0.70}}}},
             {"stage": "universal", "dataset": "d", "summary": {"mean": {"dice": {"mean": 0.85}}}}]  # fmt: skip
    rec = recommend(rows, 0.03, cross)["d"]
    assert (rec["rule"], rec["best"], rec["recommended"], rec["score"]) == ("leave-one-source-out Dice", "universal", "universal", 0.85)
    assert recommend(rows, 0.2, cross)["d"]["recommended"] == "experts/d"  # within 0.2 of 0.85; distill has no row
    assert recommend(rows, 0.03, [])["d"]["rule"] == "validation Dice"
    # a student with rows competes; its ONNX export has the same weights, hence its rows, and deploys
    cross.append({"stage": "distill", "dataset": "d", "summary": {"mean": {"dice": {"mean": 0.84}}}})
    onnx = {**_row("export/distill-d", 300_000, 0.9), "stage": "export", "format": "onnx", "trained_by": "distill"}
    rec = recommend([*rows, onnx], 0.03, cross)["d"]
    assert (rec["best"], rec["recommended"], rec["format"], rec["score"]) == ("universal", "export/distill-d", "onnx", 0.84)


def test_a_stage_name_is_a_folder_name_and_not_the_data_folder():
    for bad in ("data", "my stage", "../x"):
        with pytest.raises(MedalloyError, match="stage name"):
            load_pipeline(_cfg(**{bad: {"kind": "experts"}}))


def test_predictions_are_scored_in_the_datasets_own_label_values(tmp_path):
    import numpy as np

    from medalloy.data.io import read_label, write_label
    from medalloy.pipeline.evaluate import keep_dataset_labels

    write_label(tmp_path / "a.png", np.array([[0, 1], [2, 2]], dtype=np.uint8))
    keep_dataset_labels(tmp_path, {"background": 0, "lung": 1, "heart": 2}, {"background": 0, "lung": 1})
    assert read_label(tmp_path / "a.png")[0].tolist() == [[0, 1], [0, 0]]  # heart is not this dataset's: background
    write_label(tmp_path / "a.png", np.array([[0, 1], [2, 2]], dtype=np.uint8))
    keep_dataset_labels(tmp_path, {"background": 0, "lung": 1, "heart": 2}, {"background": 0, "heart": 1, "lung": 2})
    assert read_label(tmp_path / "a.png")[0].tolist() == [[0, 2], [1, 1]]  # mapped by name


def test_a_variable_holding_a_relative_path_is_read_from_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "data" / "Dataset001_X").mkdir(parents=True)
    (tmp_path / "configs").mkdir()
    yaml_file = tmp_path / "configs" / "p.yaml"
    yaml_file.write_text(
        "name: p\ndatasets:\n  x: {path: '${DATA}/Dataset001_X'}\n  y: {path: 'local/Dataset002_Y'}\nstages: {experts: {}}\n", encoding="utf-8"
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_pipeline(yaml_file, {"DATA": "data"})
    assert cfg.datasets["x"].path == tmp_path / "data" / "Dataset001_X"  # from where the command runs
    assert cfg.datasets["y"].path == tmp_path / "configs" / "local" / "Dataset002_Y"  # a path written in the file: from the file
    # a value that is no existing path is left as typed (then relative to the file, like any other)
    assert load_pipeline(yaml_file, {"DATA": "elsewhere"}).datasets["x"].path == tmp_path / "configs" / "elsewhere" / "Dataset001_X"
