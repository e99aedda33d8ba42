"""End to end on tiny synthetic data: train an expert, predict held-out cases, evaluate, via API and CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medalloy.cli import main
from medalloy.data.dataset import RawDataset
from medalloy.data.io import read_image, read_label
from medalloy.data.synth import generate_dataset
from medalloy.errors import MedalloyError
from medalloy.evaluation import evaluate_folders
from medalloy.predict import predict_cases, predict_folder
from medalloy.recipes.expert import load_expert, train_expert

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cxr(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return generate_dataset("Dataset902_SynthCXR", root, seed=1, cases_per_source=5, test_cases_per_source=2, progress=False)


@pytest.fixture(scope="module")
def cxr_run(cxr, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "cxr"
    result = train_expert(cxr, run, steps=60, batch_size=6, val_every=30, seed=0, precision="fp32", progress=False)
    return run, result


def test_expert_learns_synthetic_cxr(cxr_run):
    run, result = cxr_run
    assert result["status"] == "done" and result["steps"] == 60
    # Background-only or inverted predictions score ~0; a learning expert is far above.
    assert result["best"]["metrics"]["val/SynthCXR/dice_lung"] > 0.85
    assert result["best"]["metrics"]["val/SynthCXR/dice_heart"] > 0.6
    for name in ("run.json", "plan.json", "config.yaml", "split.json", "metrics.jsonl", "training_curve.png"):
        assert (run / name).exists(), name
    split = json.loads((run / "split.json").read_text(encoding="utf-8"))["datasets"]["SynthCXR"]
    assert not set(split["train"]) & set(split["val"])
    model, plan, record = load_expert(run / "checkpoints" / "best.safetensors")
    assert record["method"] == "expert" and record["tasks"][0]["labels"] == {"background": 0, "lung": 1, "heart": 2}
    assert plan.label_values == [0, 1, 2]


def test_predict_and_evaluate_held_out(cxr, cxr_run, tmp_path):
    run, _ = cxr_run
    pred = tmp_path / "pred"
    written = predict_folder(run, cxr / "imagesTs", pred, probabilities=True, precision="fp32", progress=False)
    ds = RawDataset(cxr)
    assert sorted(p.name for p in written) == sorted(f"{c.case_id}.png" for c in ds.test_cases())
    for case in ds.test_cases():
        image, meta = read_image(case.images)
        label, lmeta = read_label(pred / f"{case.case_id}.png")
        assert label.shape == meta.shape
        assert set(np.unique(label)) <= {0, 1, 2}
        probs = np.load(pred / f"{case.case_id}.npz")["probabilities"].astype(np.float32)
        assert probs.shape == (3, *meta.shape)
        np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-2)
        # labels 0,1,2 are class indices here; float16 storage may flip near-ties only
        assert (probs.argmax(0) == label).mean() > 0.995
    res = evaluate_folders(pred, cxr / "labelsTs", dataset=cxr, overlays=False, progress=False)
    assert res["summary"]["classes"]["lung"]["dice"]["mean"] > 0.85


def test_predict_cases_by_id_keeps_the_named_labels(cxr, cxr_run, tmp_path):
    run, _ = cxr_run
    ds = RawDataset(cxr)
    ids = [c.case_id for c in ds.cases[:3]]
    full = predict_cases(run, cxr, ids, tmp_path / "all", progress=False)
    lung = predict_cases(run, cxr, ids, tmp_path / "lung", keep_labels=["lung"], progress=False)
    assert [p.name for p in full] == [f"{i}.png" for i in ids]
    for cid, f, g in zip(ids, full, lung):
        a, b = read_label(f)[0], read_label(g)[0]
        truth = read_label(ds.case(cid).label)[0]
        assert (a == 2).any()  # the heart is predicted...
        np.testing.assert_array_equal(b, np.where(a == 1, 1, 0))  # ...and dropped when only lung is kept
        inter = np.logical_and(a == 1, truth == 1).sum()
        assert 2 * inter / ((a == 1).sum() + (truth == 1).sum()) > 0.85
    with pytest.raises(MedalloyError, match="no label 'liver'"):
        predict_cases(run, cxr, ids, tmp_path / "x", keep_labels=["liver"], progress=False)
    with pytest.raises(MedalloyError, match="no case 'ghost'"):
        predict_cases(run, cxr, ["ghost"], tmp_path / "x", progress=False)
    before = full[0].read_bytes()
    with pytest.raises(MedalloyError, match="overwrite"):
        predict_cases(run, cxr, ids, tmp_path / "all", progress=False)
    assert full[0].read_bytes() == before
    assert not (tmp_path / "x").exists()


def test_predict_refuses_to_overwrite(cxr, cxr_run, tmp_path, capsys):
    run, _ = cxr_run
    out = tmp_path / "p"
    assert main(["-q", "predict", str(run), "--input", str(cxr / "imagesTs"), "--output", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["-q", "predict", str(run), "--input", str(cxr / "imagesTs"), "--output", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_train_refuses_to_replace_an_existing_run(cxr, cxr_run, capsys):
    run, _ = cxr_run
    before = (run / "run.json").read_text(encoding="utf-8")
    assert main(["-q", "train", "expert", str(cxr), "--out", str(run), "--steps", "5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(run) in err[0] and "--overwrite" in err[0]
    assert (run / "run.json").read_text(encoding="utf-8") == before


def test_predict_with_foreign_checkpoint_fails_cleanly(cxr, tmp_path, capsys):
    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(b"\x00" * 64)
    assert main(["-q", "predict", str(bogus), "--input", str(cxr / "imagesTs"), "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.safetensors" in err[0]


def test_3d_expert_keeps_nifti_geometry(tmp_path):
    ds_path = generate_dataset("Dataset901_SynthMR", tmp_path / "d", seed=2, cases_per_source=5, test_cases_per_source=1, progress=False)
    run = tmp_path / "mr"
    res = train_expert(ds_path, run, steps=6, val_every=6, seed=0, progress=False)
    assert res["steps"] == 6
    pred = tmp_path / "pred"
    predict_folder(run, ds_path / "imagesTs", pred, progress=False)
    ds = RawDataset(ds_path)
    for case in ds.test_cases():
        _, meta = read_image(case.images)
        _, pmeta = read_label(pred / f"{case.case_id}.nii.gz")
        assert pmeta.shape == meta.shape
        np.testing.assert_allclose(pmeta.affine, meta.affine, atol=1e-5)
        np.testing.assert_allclose(pmeta.spacing, meta.spacing, atol=1e-5)


def test_explicit_split_is_used_and_checked(cxr, tmp_path):
    ds = RawDataset(cxr)
    ids = [c.case_id for c in ds.cases]
    res = train_expert(cxr, tmp_path / "r", split={"train": ids[:3], "val": ids[3:4]}, steps=2, val_every=2, progress=False)
    assert (res["train_cases"], res["val_cases"]) == (3, 1)
    assert json.loads((tmp_path / "r" / "split.json").read_text(encoding="utf-8"))["datasets"]["SynthCXR"]["val"] == ids[3:4]
    with pytest.raises(MedalloyError, match="not in the dataset"):
        train_expert(cxr, tmp_path / "r2", split={"train": ["nope"]}, steps=1, progress=False)
