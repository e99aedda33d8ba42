"""What leave-one-source-out rebuilds for each stage, without training: which models are retrained
for a source, from which rebuilt inputs, and which answer as they are."""

from __future__ import annotations

from pathlib import Path

import pytest

from medalloy.data.synth import generate_dataset
from medalloy.pipeline import load_pipeline
from medalloy.pipeline.cross_source import REBUILD, Without, _domain, _with_inputs
from medalloy.pipeline.datasets import resolve_datasets
from medalloy.pipeline.graph import plan_stages
from medalloy.pipeline.stages import Context


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("sets")
    return {
        "cxr": generate_dataset("SynthCXR", tmp / "cxr", cases_per_source=4, test_cases_per_source=0, progress=False),  # siteA, siteB
        "lungonly": generate_dataset("SynthCXRLung", tmp / "lung", cases_per_source=4, test_cases_per_source=0, progress=False),  # siteC, siteD
    }


def _context(folders: dict[str, Path], tmp: Path, stages: dict, records: dict) -> tuple[Context, object]:
    cfg = load_pipeline({"datasets": {n: {"path": str(p)} for n, p in folders.items()}, "stages": {**stages, "evaluate": {"leave_one_source_out": True}}})
    datasets = resolve_datasets(cfg.datasets, tmp, build=True, progress=False, held_out=cfg.held_out)
    plans = {p.name: p for p in plan_stages(cfg, datasets)}
    return Context(tmp, cfg, datasets, records, progress=False, lines=False), plans["evaluate"]


def _experts_record(tmp: Path, stage: str) -> dict:
    return {"kind": "experts", "models": [{"name": f"{stage}/{d}", "path": f"{stage}/{d}", "datasets": [d]} for d in ("cxr", "lungonly")]}


def _rebuild(ctx: Context, evaluate, stages: list[str], dataset: str, source: str) -> dict:
    dom = _domain(ctx, evaluate, ["cxr", "lungonly"], dataset, source, [])
    done: dict[str, Without] = {}
    out = {}
    for stage in stages:
        w, jobs, why = REBUILD[ctx.records[stage]["kind"]](ctx, stage, dom, done)
        if w is not None:
            done[stage] = w
        out[stage] = (w, jobs, why)
    return out


def test_students_of_experts_are_distilled_again_only_for_the_left_out_sources_dataset(folders, tmp_path, monkeypatch):
    import medalloy.recipes.distill as distill

    seen = {}

    def fake(paths, teacher, out, **kw):
        seen.update(paths=paths, teacher=teacher, out=out, split=kw["split"])
        return {}

    monkeypatch.setattr(distill, "train_distill", fake)
    records = {
        "experts": _experts_record(tmp_path, "experts"),
        "distill": {
            "kind": "distill",
            "teacher": "experts",
            "models": [{"name": f"distill/{d}", "path": f"distill/{d}", "datasets": [d]} for d in ("cxr", "lungonly")],
        },
    }
    ctx, evaluate = _context(folders, tmp_path, {"experts": {}, "distill": {"teacher": "experts"}}, records)
    got = _rebuild(ctx, evaluate, ["experts", "distill"], "cxr", "siteA")
    base = tmp_path / "evaluate" / "cross-source" / "cxr-siteA"
    experts, expert_jobs, _ = got["experts"]
    assert experts.per_dataset == {"lungonly": tmp_path / "experts" / "lungonly", "cxr": base / "experts" / "cxr"}
    assert [j.folder for j in expert_jobs] == [base / "experts" / "cxr"]
    students, student_jobs, _ = got["distill"]
    # the lung-only student never saw the chest set: it answers as it is; the chest set's student is
    # distilled again, from the chest expert retrained without siteA
    assert students.per_dataset == {"lungonly": tmp_path / "distill" / "lungonly", "cxr": base / "distill" / "cxr"}
    assert [j.folder for j in student_jobs] == [base / "distill" / "cxr"]
    student_jobs[0].train(None, False, False)
    assert seen["teacher"] == base / "experts" / "cxr" and seen["paths"] == [folders["cxr"]]
    kept = {c.case_id for c in ctx.datasets["cxr"].raw.labelled_cases() if c.source == "siteB"}
    (split,) = seen["split"].values()
    assert set(split["train"] + split["val"]) <= kept and split["train"]  # siteB's training cases only


def test_an_amalgamation_and_a_multi_dataset_student_are_built_from_their_rebuilt_inputs(folders, tmp_path, monkeypatch):
    import medalloy.recipes.amalgamate as amalgamate
    import medalloy.recipes.distill as distill

    calls = {}
    monkeypatch.setattr(amalgamate, "train_amalgamate", lambda paths, experts, out, **kw: calls.update(experts=experts) or {})
    monkeypatch.setattr(distill, "train_distill", lambda paths, teacher, out, **kw: calls.update(teacher=teacher) or {})
    records = {
        "experts": _experts_record(tmp_path, "experts"),
        "universal": {"kind": "universal", "models": [{"name": "universal", "path": "universal", "datasets": ["cxr", "lungonly"]}]},
        "amalgamate": {"kind": "amalgamate", "models": [{"name": "amalgamate", "path": "amalgamate", "datasets": ["cxr", "lungonly"]}]},
        "distill": {"kind": "distill", "teacher": "universal", "models": [{"name": "distill", "path": "distill", "datasets": ["cxr", "lungonly"]}]},
    }
    stages = {"experts": {}, "universal": {}, "amalgamate": {"experts": ["experts"]}, "distill": {"teacher": "universal"}}
    ctx, evaluate = _context(folders, tmp_path, stages, records)
    got = _rebuild(ctx, evaluate, list(records), "lungonly", "siteC")
    base = tmp_path / "evaluate" / "cross-source" / "lungonly-siteC"
    # lungonly keeps siteD: its expert is retrained; the chest expert answers as it is
    assert got["experts"][0].per_dataset == {"cxr": tmp_path / "experts" / "cxr", "lungonly": base / "experts" / "lungonly"}
    for stage in ("universal", "amalgamate", "distill"):
        w, jobs, _ = got[stage]
        assert (w.model, w.datasets, [j.folder for j in jobs]) == (base / stage, ["cxr", "lungonly"], [base / stage])
    # the amalgamation's experts are the rebuilt ones; the student's teacher the rebuilt universal model
    got["amalgamate"][1][0].train(None, False, False)
    got["distill"][1][0].train(None, False, False)
    assert calls == {"experts": [tmp_path / "experts" / "cxr", base / "experts" / "lungonly"], "teacher": base / "universal"}


def test_stages_from_outside_cannot_be_rebuilt_and_say_so(folders, tmp_path):
    outside = str(tmp_path / "some_teacher")
    Path(outside).mkdir()
    records = {"distill": {"kind": "distill", "teacher": outside, "models": [{"name": "distill", "path": "distill", "datasets": ["cxr", "lungonly"]}]}}
    ctx, evaluate = _context(folders, tmp_path, {"distill": {"teacher": outside}}, records)
    w, jobs, why = _rebuild(ctx, evaluate, ["distill"], "cxr", "siteA")["distill"]
    assert (w, jobs) == (None, []) and "teacher is from outside the pipeline" in why


def test_a_student_under_evaluation_brings_its_teacher_into_the_rebuild(folders, tmp_path):
    records = {
        "experts": _experts_record(tmp_path, "experts"),
        "universal": {"kind": "universal", "models": []},
        "distill": {"kind": "distill", "teacher": "universal", "models": []},
        "export": {"kind": "export", "models": []},
    }
    ctx, _ = _context(folders, tmp_path, {"experts": {}, "universal": {}, "distill": {"teacher": "universal"}, "export": {}}, records)
    assert _with_inputs(ctx, ["distill"]) == ["universal", "distill"]  # not the experts nobody reads
