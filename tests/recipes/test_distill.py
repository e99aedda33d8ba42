"""Distillation recipe end to end on tiny synthetic data: a frozen teacher (bit-identical after),
a student within its budget that learns, every loss term logged, baselines in the same code,
prediction and ONNX export of the student."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medalloy.data.dataset import RawDataset
from medalloy.data.io import read_label
from medalloy.data.synth import generate_dataset
from medalloy.engine import checkpoint as ckpt
from medalloy.engine.logging import read_metrics
from medalloy.errors import MedalloyError
from medalloy.planning.fingerprint import fingerprint
from medalloy.planning.planner import plan_dataset
from medalloy.predict import predict_cases
from medalloy.recipes.distill import DistillConfig, confidence, train_distill
from medalloy.recipes.expert import ExpertConfig, train_expert

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cxr(tmp_path_factory):
    return generate_dataset("Dataset902_SynthCXR", tmp_path_factory.mktemp("synth"), seed=5, cases_per_source=6, test_cases_per_source=1, progress=False)


@pytest.fixture(scope="module")
def teacher(cxr, tmp_path_factory):
    ds = RawDataset(cxr)
    plan = plan_dataset(ds, fingerprint(ds, progress=False), max_2d_side=64)
    cfg = ExpertConfig(folds=4, max_val_cases=2)
    cfg.train.steps, cfg.train.val_every = 120, 120
    out = tmp_path_factory.mktemp("runs") / "teacher"
    train_expert(cxr, out, plan=plan, config=cfg, progress=False)
    return out


def _cfg(losses: str, steps: int = 60) -> DistillConfig:
    cfg = DistillConfig(losses=losses, folds=4, max_val_cases=2)
    cfg.train.steps, cfg.train.val_every, cfg.train.log_every = steps, steps, 10
    return cfg


def test_relation_kd_student_learns_from_a_frozen_teacher(cxr, teacher, tmp_path):
    before = ckpt.load_checkpoint(teacher / "checkpoints" / "best.safetensors")[0]
    res = train_distill(cxr, teacher, tmp_path / "student", config=_cfg("relation"), progress=False)
    after = ckpt.load_checkpoint(teacher / "checkpoints" / "best.safetensors")[0]
    assert all(torch.equal(before[k], after[k]) for k in before)  # the teacher's file is untouched
    assert res["params"] <= 350_000 and res["teacher_params"] >= 5 * res["params"]
    rows = [r for r in read_metrics(tmp_path / "student" / "metrics.jsonl") if r["kind"] == "train"]
    for part in ("seg", "logits", "kernel", "affinity"):
        assert all(np.isfinite(r[f"loss/{part}"]) for r in rows), part
    assert rows[-1]["loss/logits"] < rows[0]["loss/logits"]  # the student moves towards the teacher
    assert res["best"]["metrics"]["val/dice_lung"] > 0.6, res["best"]
    tensors, record = ckpt.load_checkpoint(tmp_path / "student" / "checkpoints" / "best.safetensors")
    assert record["method"] == "distill" and record["teacher"]["method"] == "expert" and record["teacher"]["steps"] == 120
    assert not any(k.startswith("model/teacher") for k in tensors)  # frozen modules are not saved
    ds = RawDataset(cxr)
    case = ds.labelled_cases()[0]
    written = predict_cases(tmp_path / "student", cxr, [case.case_id], tmp_path / "pred", progress=False)
    assert read_label(written[0])[0].shape == read_label(case.label)[0].shape


def test_baselines_train_only_their_terms(cxr, teacher, tmp_path):
    for losses, parts in (("student_alone", {"seg"}), ("skd", {"seg", "logits", "pairwise"}), ("cwd", {"seg", "cwd"}), ("relation_cross", {"seg", "logits", "kernel", "affinity", "cross"})):
        train_distill(cxr, teacher, tmp_path / losses, config=_cfg(losses, steps=4), progress=False)
        row = [r for r in read_metrics(tmp_path / losses / "metrics.jsonl") if r["kind"] == "train"][-1]
        assert {k[5:] for k in row if k.startswith("loss/")} == parts, losses
    with pytest.raises(MedalloyError, match="unknown stage 'dec9'"):
        train_distill(cxr, teacher, tmp_path / "bad", config=_cfg("relation").model_copy(update={"stages": ["dec9"]}), progress=False)
    assert not (tmp_path / "bad").exists()  # refused before anything is written


def test_several_datasets_a_partially_labelled_one_trains_its_classes_or_teaches_through_the_teacher(cxr, teacher, tmp_path):
    # SynthCXR (lung + heart, the teacher's) and SynthCXRLung (lung only, other sites): by default the
    # lung-only set's steps train the lung through the marginal loss (its "background" hides hearts);
    # with partial_labels "teacher" they carry no segmentation loss; both still distil
    lung_only = generate_dataset("Dataset903_SynthCXRLung", tmp_path / "data", seed=6, cases_per_source=4, test_cases_per_source=1, progress=False)
    seg_by_mode = {}
    for mode in ("marginal", "teacher"):
        cfg = _cfg("relation", steps=12).model_copy(update={"partial_labels": mode})
        cfg.train.log_every = 1
        res = train_distill([cxr, lung_only], teacher, tmp_path / mode, config=cfg, progress=False)
        assert set(res["train_cases"]) == {"SynthCXR", "SynthCXRLung"} and list(res["val_cases"]) == ["SynthCXR"]
        rows = [r for r in read_metrics(tmp_path / mode / "metrics.jsonl") if r["kind"] == "train"]
        assert all(r["loss/logits"] > 0 and r["loss/affinity"] > 0 for r in rows)
        # each step drew one dataset: its own curve has the value, the other's none (NaN, logged as null)
        full = [r["loss/seg/SynthCXR"] for r in rows]
        part = [r["loss/seg/SynthCXRLung"] for r in rows]
        assert all((a is None) != (b is None) for a, b in zip(full, part))
        assert 0 < sum(v is not None for v in part) < len(rows)
        seg_by_mode[mode] = [v for v in part if v is not None]
        record = ckpt.load_checkpoint(tmp_path / mode / "checkpoints" / "last.safetensors")[1]
        assert [(d["dataset"], d["fully_labelled"], d["annotated"]) for d in record["datasets"]] == [("SynthCXR", True, [1, 2]), ("SynthCXRLung", False, [1])]
        assert record["partial_labels"] == mode
    assert all(v > 0 for v in seg_by_mode["marginal"]) and all(v == 0 for v in seg_by_mode["teacher"])
    split = json.loads((tmp_path / "marginal" / "split.json").read_text(encoding="utf-8"))
    assert set(split["datasets"]) == {"SynthCXR", "SynthCXRLung"} and split["train"] == split["datasets"]["SynthCXR"]["train"]
    # a dataset whose label the teacher does not know is refused before anything is written
    endo = generate_dataset("Dataset904_SynthEndo", tmp_path / "data", seed=6, cases_per_source=2, test_cases_per_source=1, progress=False)
    with pytest.raises(MedalloyError, match="label 'lesion' = 1, but the teacher's plan lacks it"):
        train_distill([cxr, endo], teacher, tmp_path / "bad", config=_cfg("relation", steps=2), progress=False)
    assert not (tmp_path / "bad").exists()


def test_confidence_is_one_for_certain_and_zero_for_uniform_predictions():
    sure = torch.tensor([[[[20.0]], [[-20.0]], [[-20.0]]]])
    unsure = torch.zeros(1, 3, 1, 1)
    assert confidence(sure, "softmax").item() == pytest.approx(1.0, abs=1e-4)
    assert confidence(unsure, "softmax").item() == pytest.approx(0.0, abs=1e-6)
    assert confidence(torch.zeros(1, 2, 1, 1), "sigmoid").item() == pytest.approx(0.0, abs=1e-6)
    assert confidence(torch.full((1, 2, 1, 1), 30.0), "sigmoid").item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(("separable", "stem", "upsample"), [(False, 0, "interpolate"), (True, 0, "interpolate"), (False, 1, "interpolate"), (False, 2, "interpolate"), (False, 1, "shuffle")])
def test_student_run_exports_to_onnx_with_matching_logits(cxr, teacher, tmp_path, separable, stem, upsample):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from medalloy.export import export_onnx
    from medalloy.interop.onnx_runtime import load_onnx
    from medalloy.recipes.distill import load_student

    cfg = _cfg("logit_kd", steps=4)
    cfg.separable, cfg.stem, cfg.upsample = separable, stem, upsample
    train_distill(cxr, teacher, tmp_path / "s", config=cfg, progress=False)
    meta = export_onnx(tmp_path / "s", tmp_path / "s.onnx")
    assert meta["method"] == "distill" and meta["labels"] == {"background": 0, "lung": 1, "heart": 2}
    student, plan, record = load_student(tmp_path / "s" / "checkpoints" / "best.safetensors")
    assert record["student"]["separable"] is separable
    assert any(getattr(m, "groups", 1) > 1 for m in student.modules()) is separable  # loaded as trained
    assert record["student"]["stem"] == stem and ("enc0" in student.medalloy_stages) is (stem == 0)
    assert ("enc1" in student.medalloy_stages) is (stem < 2)  # a stem of 2 starts at 1/4
    assert record["student"]["upsample"] == upsample and getattr(student, "upsample", "interpolate") == upsample
    graph, _, _ = load_onnx(tmp_path / "s.onnx")
    x = torch.randn(3, plan.in_channels, *plan.patch_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert float((student(x) - graph(x)).abs().max()) < 1e-3
    # every student exports with a dynamic spatial size: one more total stride along the last axis
    assert meta["spatial"]["dynamic"], meta["spatial"]
    wider = torch.randn(1, plan.in_channels, *plan.patch_size[:-1], plan.patch_size[-1] + meta["spatial"]["multiple_of"][-1], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert float((student(wider) - graph(wider)).abs().max()) < 1e-3


def test_a_run_without_a_stem_records_the_default_it_resolved(cxr, teacher, tmp_path, capsys):
    from medalloy.models.students import default_stem
    from medalloy.recipes.distill import load_student

    cfg = _cfg("logit_kd", steps=2)
    assert cfg.stem is None
    train_distill(cxr, teacher, tmp_path / "s", config=cfg, progress=True)
    # a student of fewer steps than its teacher's 120 is told so
    assert "the student trains 2 steps, its teacher trained 120" in capsys.readouterr().out
    _, plan, record = load_student(tmp_path / "s" / "checkpoints" / "last.safetensors")
    # the synthetic patch keeps one pooling only (>= 32 px): neither no stem nor the radiographs' two
    assert record["student"]["stem"] == default_stem(plan) == 1, plan.patch_size
    assert "stem: null" not in (tmp_path / "s" / "config.yaml").read_text()  # a resumed run keeps the same student
    # a record naming an upsampling this version does not know is a one-line error naming the file
    tensors, record = ckpt.load_checkpoint(tmp_path / "s" / "checkpoints" / "last.safetensors")
    record["student"]["upsample"] = "nearest"
    ckpt.save_checkpoint(tmp_path / "odd.safetensors", tensors, record)
    with pytest.raises(MedalloyError, match="odd.safetensors.*lacks a valid plan or student"):
        load_student(tmp_path / "odd.safetensors")


def test_cli_stem_flags_reach_the_config(monkeypatch):
    import medalloy.recipes.distill as recipe
    from medalloy.cli import main

    seen, ups = [], []

    def fake(*args, **kw):
        seen.append(kw.get("stem"))
        ups.append(kw.get("upsample"))
        return {"params": 1, "teacher_params": 2, "steps": 0, "seconds": 0.0, "best": {}}

    monkeypatch.setattr(recipe, "train_distill", fake)
    for flags, stem in [([], None), (["--stem"], 1), (["--stem-depth", "2"], 2), (["--stem-depth", "0"], 0)]:
        assert main(["distill", "DS", "--teacher", "T", "--out", "O", *flags]) == 0
        assert seen[-1] == stem and ups[-1] is None
    assert main(["distill", "DS", "--teacher", "T", "--out", "O", "--upsample", "shuffle"]) == 0 and ups[-1] == "shuffle"


def test_a_student_plan_json_sets_the_filters_and_is_recorded_by_its_absolute_path(cxr, teacher, tmp_path, monkeypatch):
    from medalloy.planning.plan import load_plan, save_plan
    from medalloy.recipes.distill import load_student

    plan = load_plan(teacher / "plan.json")
    n = len(plan.network.strides)
    own = plan.model_copy(update={"network": plan.network.model_copy(update={"filters": [3 + 2 * i for i in range(n)]})})
    save_plan(own, tmp_path / "student.json")
    monkeypatch.chdir(tmp_path)  # given relative, recorded absolute: a resumed run finds it from any folder
    cfg = _cfg("logit_kd", steps=2)
    cfg.student = "student.json"
    train_distill(cxr, teacher, tmp_path / "s", config=cfg, progress=False)
    model, _, record = load_student(tmp_path / "s" / "checkpoints" / "last.safetensors")
    stem = record["student"]["stem"]
    assert record["student"]["filters"] == [3 + 2 * i for i in range(stem, n)]
    assert record["student"]["size"] == str(tmp_path / "student.json")
    assert str(tmp_path / "student.json") in (tmp_path / "s" / "config.yaml").read_text()


def test_an_augment_preset_name_keeps_the_yaml_augment_fields_over_it(cxr, tmp_path, monkeypatch):
    import medalloy.recipes.distill as recipe

    resolved, real = [], recipe.resolve_config

    def spy(*args, **kw):
        resolved.append(real(*args, **kw))
        raise RuntimeError("stop after the config")

    monkeypatch.setattr(recipe, "resolve_config", spy)
    cfg_file = tmp_path / "distill.yaml"
    cfg_file.write_text("augment:\n  p_blur: 0.9\n", encoding="utf-8")
    with pytest.raises(RuntimeError, match="stop after the config"):
        train_distill(cxr, "unused-teacher", tmp_path / "out", config=cfg_file, progress=False, augment="strong")
    assert resolved[0].augment.p_blur == 0.9 and resolved[0].augment.p_contrast == 0.5
    assert not (tmp_path / "out").exists()
