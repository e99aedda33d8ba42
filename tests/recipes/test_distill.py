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
    cfg.train.steps, cfg.train.val_every, cfg.train.precision = 120, 120, "fp32"  # the students' floors: not the CPU's bf16 units
    out = tmp_path_factory.mktemp("runs") / "teacher"
    train_expert(cxr, out, plan=plan, config=cfg, progress=False)
    return out


def _cfg(losses: str, steps: int = 60) -> DistillConfig:
    cfg = DistillConfig(losses=losses, folds=4, max_val_cases=2)
    cfg.train.steps, cfg.train.val_every, cfg.train.log_every, cfg.train.precision = steps, steps, 10, "fp32"
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
    assert res["best"]["metrics"]["val/SynthCXR/dice_lung"] > 0.6, res["best"]
    tensors, record = ckpt.load_checkpoint(tmp_path / "student" / "checkpoints" / "best.safetensors")
    assert record["method"] == "distill" and record["teacher"]["method"] == "expert" and record["teacher"]["steps"] == 120
    assert not any(k.startswith("model/teacher") for k in tensors)  # frozen modules are not saved
    ds = RawDataset(cxr)
    case = ds.labelled_cases()[0]
    written = predict_cases(tmp_path / "student", cxr, [case.case_id], tmp_path / "pred", progress=False)
    assert read_label(written[0])[0].shape == read_label(case.label)[0].shape


def _dice(pred: np.ndarray, truth: np.ndarray, value: int) -> float:
    a, b = pred == value, truth == value
    return float(2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum()))


def _student_predicts_the_dataset_labels(cxr, student_run, out):
    """The student's best checkpoint, on its own validation cases: label maps in the dataset's
    values, on the label's grid, with the lung found; returns the mean lung Dice."""
    val = json.loads((student_run / "split.json").read_text(encoding="utf-8"))["datasets"]["SynthCXR"]["val"]
    ds = RawDataset(cxr)
    written = predict_cases(student_run, cxr, val, out, precision="fp32", progress=False)
    scores = []
    for case_id, path in zip(val, written):
        pred, truth = read_label(path)[0], read_label(ds.case(case_id).label)[0]
        assert pred.shape == truth.shape and set(np.unique(pred)) <= {0, 1, 2}, case_id
        scores.append(_dice(pred, truth, 1))
    return float(np.mean(scores))


@pytest.fixture(scope="module")
def universal_teacher(cxr, tmp_path_factory):
    """A tiny universal (Hermes) run of a lung-only dataset and SynthCXR: the distilled dataset is
    its second, so the teacher must be bound to it (lung and heart; the first has lung only)."""
    from medalloy.recipes.universal import UniversalConfig, train_universal

    lung_only = generate_dataset(
        "Dataset903_SynthCXRLung", tmp_path_factory.mktemp("synth"), seed=6, cases_per_source=3, test_cases_per_source=1, progress=False
    )
    cfg = UniversalConfig(max_2d_side=64, base_filters=8, max_val_cases=2, folds=4)
    cfg.train.steps, cfg.train.val_every, cfg.train.precision = 60, 60, "fp32"
    out = tmp_path_factory.mktemp("runs") / "universal"
    train_universal([lung_only, cxr], out, config=cfg, progress=False)
    return out


def test_a_universal_teacher_teaches_through_the_per_task_binary_logit_kd(cxr, universal_teacher, tmp_path, monkeypatch):
    import medalloy.recipes.distill as recipe
    from medalloy.engine.precision import autocast, resolve_precision
    from medalloy.losses import LogitKDLoss
    from medalloy.recipes.registry import load_checkpoint_model

    calls, taught = [], []  # (student, teacher logits, loss) of every logit term; (image, teacher logits) of every teacher call

    class SpyKD(LogitKDLoss):
        def forward(self, student, teacher, weight=None):
            out = super().forward(student, teacher, weight)
            calls.append((student.detach().clone(), teacher.detach().clone(), float(out.detach())))
            return out

    real_load = recipe.load_teacher

    def spy_load(path, dataset, device="cpu"):
        model, plan, record = real_load(path, dataset, device)
        model.register_forward_hook(lambda _m, args, out: taught.append((args[0].detach().clone(), out.detach().clone())))
        return model, plan, record

    monkeypatch.setattr(recipe, "LogitKDLoss", SpyKD)
    monkeypatch.setattr(recipe, "load_teacher", spy_load)
    best = universal_teacher / "checkpoints" / "best.safetensors"
    before = ckpt.load_checkpoint(best)[0]
    cfg = _cfg("relation", steps=30)
    cfg.train.log_every = 1
    res = train_distill(cxr, universal_teacher, tmp_path / "student", config=cfg, progress=False)
    after = ckpt.load_checkpoint(best)[0]
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # the teacher's file is untouched

    tensors, record = ckpt.load_checkpoint(tmp_path / "student" / "checkpoints" / "best.safetensors")
    assert record["teacher"]["method"] == "universal" and record["activation"] == "sigmoid"
    assert record["spec"]["out_channels"] == 2  # bound to SynthCXR: lung and heart (the first dataset has lung only)
    assert record["plan"]["label_values"] == [0, 1, 2] and not any(k.startswith("model/teacher") for k in tensors)
    rows = [r for r in read_metrics(tmp_path / "student" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(rows) == 30 == len(calls)
    for part in ("seg", "logits", "kernel", "affinity"):
        assert all(np.isfinite(r[f"loss/{part}"]) for r in rows), part
    assert rows[-1]["loss/logits"] < rows[0]["loss/logits"]

    # the logged logit term is the per-task Bernoulli KL at T = 2 (x T^2), by hand in float64, not the softmax form
    t = 2.0
    for row, (zs, zt, value) in zip(rows, calls):
        assert zs.shape == zt.shape and zt.shape[1] == 2
        qs, qt = torch.sigmoid(zs.double() / t), torch.sigmoid(zt.double() / t)
        kl = qt * (qt / qs).log() + (1 - qt) * ((1 - qt) / (1 - qs)).log()
        by_hand = float(kl.mean()) * t * t
        ps, pt = torch.softmax(zs.double() / t, 1), torch.softmax(zt.double() / t, 1)
        softmax_form = float((pt * (pt / ps).log()).sum(1).mean()) * t * t
        assert value == pytest.approx(by_hand, rel=1e-4) and row["loss/logits"] == pytest.approx(by_hand, rel=1e-4)
        assert abs(softmax_form - by_hand) > 0.05 * by_hand
    # the teacher that taught is the run's model bound to SynthCXR, unchanged by training: a fresh
    # load answers the last step's images with the same logits
    fresh, plan, _ = load_checkpoint_model(best, "cpu", "SynthCXR")
    x, zt = taught[-1]
    assert torch.equal(zt, calls[-1][1])
    cpu = torch.device("cpu")
    with torch.no_grad(), autocast(resolve_precision(cfg.train.precision, cpu), cpu):  # as the trainer ran it
        assert torch.allclose(fresh(x).float(), zt.float(), atol=1e-3)
    assert plan.labels == {"background": 0, "lung": 1, "heart": 2}

    assert res["best"]["metrics"]["val/SynthCXR/dice_lung"] > 0.7, res["best"]
    assert _student_predicts_the_dataset_labels(cxr, tmp_path / "student", tmp_path / "pred") > 0.7


def test_an_amalgamated_teacher_distils_through_the_cli(cxr, teacher, tmp_path, capsys):
    pytest.importorskip("einops")
    from medalloy.cli import main
    from medalloy.recipes.amalgamate import AmalgamateConfig, train_amalgamate

    acfg = AmalgamateConfig(folds=4, max_val_cases=2, max_2d_side=64, width=32, batch_size=4)
    acfg.train.steps, acfg.train.val_every, acfg.train.precision = 16, 16, "fp32"
    ka = tmp_path / "ka"
    train_amalgamate([cxr], [teacher], ka, config=acfg, progress=False)
    best = ka / "checkpoints" / "best.safetensors"
    before = ckpt.load_checkpoint(best)[0]
    config = tmp_path / "distill.yaml"
    config.write_text("folds: 4\nmax_val_cases: 2\ntrain:\n  val_every: 30\n  log_every: 1\n", encoding="utf-8")
    out = tmp_path / "student"
    assert main(["-q", "distill", str(cxr), "--teacher", str(ka), "--out", str(out), "--steps", "30", "--config", str(config), "--precision", "fp32"]) == 0
    assert "student of" in capsys.readouterr().out
    after = ckpt.load_checkpoint(best)[0]
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # experts and foundation untouched

    tensors, record = ckpt.load_checkpoint(out / "checkpoints" / "best.safetensors")
    assert record["teacher"]["method"] == "amalgamate" and record["activation"] == "sigmoid" and record["spec"]["out_channels"] == 2
    assert not any(k.startswith("model/teacher") for k in tensors) and record["params"] < record["teacher"]["params"] / 5
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert len(rows) == 30
    for part in ("seg", "logits", "kernel", "affinity"):  # the feature terms read the foundation's stages inside the bound model
        assert all(np.isfinite(r[f"loss/{part}"]) and r[f"loss/{part}"] > 0 for r in rows), part
    assert rows[-1]["loss/logits"] < rows[0]["loss/logits"]
    assert _student_predicts_the_dataset_labels(cxr, out, tmp_path / "pred") > 0.7


def test_baselines_train_only_their_terms(cxr, teacher, tmp_path):
    for losses, parts in (
        ("student_alone", {"seg"}),
        ("skd", {"seg", "logits", "pairwise"}),
        ("cwd", {"seg", "cwd"}),
        ("relation_cross", {"seg", "logits", "kernel", "affinity", "cross"}),
    ):
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
        assert set(res["train_cases"]) == {"SynthCXR", "SynthCXRLung"} and list(res["val_cases"]) == ["SynthCXR", "SynthCXRLung"]
        # the lung-only set validates on its lung alone (a heart Dice against its hearts-as-background would mean nothing)
        val = {k for r in read_metrics(tmp_path / mode / "metrics.jsonl") if r["kind"] == "val" for k, v in r.items() if k.startswith("val/") and v is not None}
        assert {k for k in val if k.startswith("val/SynthCXRLung/")} == {"val/SynthCXRLung/dice_lung"}
        assert {"val/SynthCXR/dice_lung", "val/SynthCXR/dice_heart"} <= val
        rows = [r for r in read_metrics(tmp_path / mode / "metrics.jsonl") if r["kind"] == "train"]
        assert all(r["loss/logits"] > 0 and r["loss/affinity"] > 0 for r in rows)
        # each step drew one dataset: its own curve has the value, the other's none (NaN, logged as null)
        full = [r["loss/SynthCXR"] for r in rows]
        part = [r["loss/SynthCXRLung"] for r in rows]
        assert all((a is None) != (b is None) for a, b in zip(full, part))
        assert 0 < sum(v is not None for v in part) < len(rows)
        seg_by_mode[mode] = [v for v in part if v is not None]
        record = ckpt.load_checkpoint(tmp_path / mode / "checkpoints" / "last.safetensors")[1]
        assert [(d["dataset"], d["fully_labelled"], d["annotated"]) for d in record["datasets"]] == [("SynthCXR", True, [1, 2]), ("SynthCXRLung", False, [1])]
        assert record["partial_labels"] == mode
    assert all(v > 0 for v in seg_by_mode["marginal"]) and all(v == 0 for v in seg_by_mode["teacher"])
    split = json.loads((tmp_path / "marginal" / "split.json").read_text(encoding="utf-8"))
    assert set(split) == {"fold", "datasets"} and set(split["datasets"]) == {"SynthCXR", "SynthCXRLung"}
    # a dataset whose label the teacher does not know is refused before anything is written
    endo = generate_dataset("Dataset904_SynthEndo", tmp_path / "data", seed=6, cases_per_source=2, test_cases_per_source=1, progress=False)
    with pytest.raises(MedalloyError, match="label 'lesion' = 1, but the teacher's plan lacks it"):
        train_distill([cxr, endo], teacher, tmp_path / "bad", config=_cfg("relation", steps=2), progress=False)
    assert not (tmp_path / "bad").exists()


def _scaled_copy(src, dst, factor: float):
    """An nnU-Net 2D PNG dataset with every image and label ``factor`` times larger (a site scanning at another size)."""
    import shutil

    from PIL import Image

    shutil.copytree(src, dst)
    for path in dst.rglob("*.png"):
        im = Image.open(path)
        size = (round(im.width * factor), round(im.height * factor))
        im.resize(size, Image.NEAREST if path.parent.name.startswith("labels") else Image.BILINEAR).save(path)
    return dst


def test_a_dataset_far_from_the_plan_size_trains_at_the_plan_size_as_it_is_predicted(cxr, teacher, tmp_path):
    from medalloy.planning.input_fit import dataset_geometry, misfit
    from medalloy.planning.plan import load_plan
    from medalloy.recipes.scaffold import cache_cases

    lung = generate_dataset("Dataset903_SynthCXRLung", tmp_path / "data", seed=6, cases_per_source=2, test_cases_per_source=1, progress=False)
    big = _scaled_copy(lung, tmp_path / "big" / lung.name, 2.5)
    plan = load_plan(teacher / "plan.json")
    assert misfit(plan, dataset_geometry(RawDataset(lung))) is None and misfit(plan, dataset_geometry(RawDataset(big))) > 2
    # resampled, each image (whatever its size) reaches the network at the plan's typical size: the
    # larger copy as its original does, the same anatomy on the same grid
    small_ds, big_ds = RawDataset(lung), RawDataset(big)
    own = cache_cases(small_ds, small_ds.labelled_cases(), plan, pad=False, seed=0, desc="", progress=False, rescale=True)
    fitted = cache_cases(big_ds, big_ds.labelled_cases(), plan, pad=False, seed=0, desc="", progress=False, rescale=True)
    native = cache_cases(big_ds, big_ds.labelled_cases(), plan, pad=False, seed=0, desc="", progress=False)
    typical = np.asarray(plan.median_shape) * np.asarray(plan.median_spacing or [1, 1]) / np.asarray(plan.target_spacing)
    for a, b, c in zip(own, fitted, native):
        assert a.image.shape == b.image.shape and b.label.shape == b.image.shape[1:]
        assert np.all(np.abs(np.asarray(b.image.shape[2:]) - typical) <= 1) and np.all(np.asarray(c.image.shape[2:]) > 2 * typical)
        overlap = 2 * np.logical_and(a.label > 0, b.label > 0).sum() / ((a.label > 0).sum() + (b.label > 0).sum())
        assert overlap > 0.9, overlap
    cfg = _cfg("relation", steps=2)
    train_distill([cxr, big], teacher, tmp_path / "student", config=cfg, progress=False)
    notes = load_plan(tmp_path / "student" / "plan.json").notes
    assert any(n.startswith("SynthCXRLung: images x2.") and "each resampled to it" in n for n in notes) and not any(n.startswith("SynthCXR:") for n in notes)
    assert ckpt.load_checkpoint(tmp_path / "student" / "checkpoints" / "last.safetensors")[1]["plan"]["notes"] == notes  # prediction sees it


def test_a_given_split_of_one_dataset_or_per_dataset_is_the_same_split_and_a_resumed_run_keeps_its_own(cxr, tmp_path):
    from medalloy.recipes.distill import DistillRecipe
    from medalloy.recipes.scaffold import Run

    ds = RawDataset(cxr)
    ids = [c.case_id for c in ds.labelled_cases()]
    given = {"train": ids[:4], "val": ids[4:6]}
    expected = {"fold": 2, "datasets": {"SynthCXR": given}}
    run = Run(out=tmp_path, dist=None, resume=False, progress=False)
    for split in (given, {"SynthCXR": given}):
        assert DistillRecipe(DistillConfig(fold=2), [ds], "unused", split).choose_split(run) == expected
    # a run written before the one schema held the one dataset's ids at the top of split.json
    (tmp_path / "split.json").write_text(json.dumps({"fold": 0, "train": ids[1:3], "val": ids[3:4]}), encoding="utf-8")
    resumed = Run(out=tmp_path, dist=None, resume=True, progress=False)
    kept = DistillRecipe(DistillConfig(), [ds], "unused").choose_split(resumed)
    assert kept == {"fold": 0, "datasets": {"SynthCXR": {"train": ids[1:3], "val": ids[3:4]}}}


def test_the_student_is_its_specs_build_with_the_weights_and_draws_of_the_size_choice(cxr):
    from medalloy.recipes.distill import build_student_net, choose_student
    from medalloy.recipes.students import build_student

    ds = RawDataset(cxr)
    plan = plan_dataset(ds, fingerprint(ds, progress=False), max_2d_side=64)
    torch.manual_seed(0)
    before = build_student(plan, 30000, out_channels=3, stem=1).state_dict()  # how a run chose and drew its student before specs
    next_draw = torch.rand(4)
    torch.manual_seed(0)
    spec, student = choose_student(plan, DistillConfig(student=30000, stem=1), 3)
    assert torch.equal(torch.rand(4), next_draw)  # the spec's build draws nothing: every later draw (adapters, ...) is as before
    assert student.state_dict().keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    assert spec.stem == 1 and spec.out_channels == 3 and spec.filters == student.filters and spec.network == plan.network
    build_student_net(spec).load_state_dict(student.state_dict())  # what loading builds takes the trained weights as they are


def test_confidence_is_one_for_certain_and_zero_for_uniform_predictions():
    sure = torch.tensor([[[[20.0]], [[-20.0]], [[-20.0]]]])
    unsure = torch.zeros(1, 3, 1, 1)
    assert confidence(sure, "softmax").item() == pytest.approx(1.0, abs=1e-4)
    assert confidence(unsure, "softmax").item() == pytest.approx(0.0, abs=1e-6)
    assert confidence(torch.zeros(1, 2, 1, 1), "sigmoid").item() == pytest.approx(0.0, abs=1e-6)
    assert confidence(torch.full((1, 2, 1, 1), 30.0), "sigmoid").item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(
    ("separable", "stem", "upsample"),
    [(False, 0, "interpolate"), (True, 0, "interpolate"), (False, 1, "interpolate"), (False, 2, "interpolate"), (False, 1, "shuffle")],
)
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
    assert record["spec"]["separable"] is separable
    assert any(getattr(m, "groups", 1) > 1 for m in student.modules()) is separable  # loaded as trained
    assert record["spec"]["stem"] == stem and ("enc0" in student.medalloy_stages) is (stem == 0)
    assert ("enc1" in student.medalloy_stages) is (stem < 2)  # a stem of 2 starts at 1/4
    assert record["spec"]["upsample"] == upsample and getattr(student, "upsample", "interpolate") == upsample
    graph, _, _ = load_onnx(tmp_path / "s.onnx")
    x = torch.randn(3, plan.in_channels, *plan.patch_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert float((student(x) - graph(x)).abs().max()) < 1e-3
    # every student exports with a dynamic spatial size: one more total stride along the last axis
    assert meta["spatial"]["dynamic"], meta["spatial"]
    wider = torch.randn(
        1, plan.in_channels, *plan.patch_size[:-1], plan.patch_size[-1] + meta["spatial"]["multiple_of"][-1], generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        assert float((student(wider) - graph(wider)).abs().max()) < 1e-3


def test_a_run_without_a_stem_records_the_default_it_resolved(cxr, teacher, tmp_path, capsys):
    from medalloy.recipes.distill import load_student
    from medalloy.recipes.students import default_stem

    cfg = _cfg("logit_kd", steps=2)
    assert cfg.stem is None
    train_distill(cxr, teacher, tmp_path / "s", config=cfg, progress=True)
    # a student of fewer steps than its teacher's 120 is told so
    assert "the student trains 2 steps, its teacher trained 120" in capsys.readouterr().out
    _, plan, record = load_student(tmp_path / "s" / "checkpoints" / "last.safetensors")
    # the synthetic patch keeps one pooling only (>= 32 px): neither no stem nor the radiographs' two
    assert record["spec"]["stem"] == default_stem(plan) == 1, plan.patch_size
    assert "stem: null" not in (tmp_path / "s" / "config.yaml").read_text()  # a resumed run keeps the same student
    # a record naming an upsampling this version does not know is a one-line error naming the file
    tensors, record = ckpt.load_checkpoint(tmp_path / "s" / "checkpoints" / "last.safetensors")
    record["spec"]["upsample"] = "nearest"
    ckpt.save_checkpoint(tmp_path / "odd.safetensors", tensors, record)
    with pytest.raises(MedalloyError, match="odd.safetensors: distill checkpoint .spec version 1. lacks a valid model description .'upsample'"):
        load_student(tmp_path / "odd.safetensors")


def test_cli_stem_flags_reach_the_config(monkeypatch):
    import medalloy.recipes.distill as recipe
    from medalloy.cli import main

    seen, ups = [], []

    def fake(*args, **kw):
        seen.append((kw.get("set") or {}).get("stem"))  # the flags arrive as dotted-path settings
        ups.append((kw.get("set") or {}).get("upsample"))
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
    stem = record["spec"]["stem"]
    assert record["spec"]["filters"] == [3 + 2 * i for i in range(stem, n)]
    assert record["student_size"] == str(tmp_path / "student.json") and "student" not in record  # the spec holds the student
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


# distinct non-zero weights, so a term combined with another term's weight changes the total wrongly
TERM_WEIGHTS = {"logits": 0.7, "kernel": 1.3, "affinity": 0.4, "cross": 1.9, "cwd": 0.6}
# the weight each logged term enters with (skd's unweighted pairwise affinity takes the affinity weight)
WEIGHT_OF = {"logits": "logits", "kernel": "kernel", "affinity": "affinity", "pairwise": "affinity", "cross": "cross", "cwd": "cwd"}


@pytest.fixture(scope="module")
def first_step(cxr, teacher, tmp_path_factory):
    """``(losses, weights) -> the metrics row of a one-step run``, each run once. The logged values
    of step 1 come from the initial weights (the update follows the forward pass), so the learning
    rate plays no part (TrainConfig refuses lr 0); fp32 keeps them off the CPU's bf16 units."""
    rows: dict = {}

    def run(losses: str, weights: dict[str, float]) -> dict:
        key = (losses, tuple(sorted(weights.items())))
        if key not in rows:
            # a small batch and few sampled positions only make the run faster
            cfg = DistillConfig(losses=losses, folds=4, max_val_cases=1, weights=weights, batch_size=2, max_positions=32)
            cfg.train.steps, cfg.train.val_every, cfg.train.log_every, cfg.train.precision = 1, 1, 1, "fp32"
            out = tmp_path_factory.mktemp("total")
            train_distill(cxr, teacher, out, config=cfg, progress=False, seed=3)
            [row] = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
            rows[key] = row
        return rows[key]

    return run


@pytest.mark.parametrize(
    ("losses", "term"),
    [*[("relation_cross", t) for t in ("logits", "kernel", "affinity", "cross")], ("skd", "pairwise"), ("cwd", "cwd")],
)
def test_the_total_loss_is_the_weighted_sum_of_the_logged_terms(first_step, losses, term):
    base = first_step(losses, TERM_WEIGHTS)
    terms = {k[5:]: v for k, v in base.items() if k.startswith("loss/")}
    assert term in terms and all(v > 0 for v in terms.values()), terms
    # the seg term has no weight (1); every other term enters with its own weight, and nothing else does
    weighted = terms["seg"] + sum(TERM_WEIGHTS[WEIGHT_OF[k]] * v for k, v in terms.items() if k != "seg")
    assert base["loss"] == pytest.approx(weighted, rel=1e-5)
    name = WEIGHT_OF[term]
    changed = first_step(losses, {**TERM_WEIGHTS, name: TERM_WEIGHTS[name] + 2.0})
    assert {k: changed[f"loss/{k}"] for k in terms} == pytest.approx(terms, rel=1e-6)  # the same step, the same terms
    # the weight scales the logged (unweighted) term, and only it
    assert changed["loss"] - base["loss"] == pytest.approx(2.0 * terms[term], rel=1e-4, abs=1e-5)
