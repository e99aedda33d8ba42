"""Universal (Hermes) recipe end to end on tiny synthetic data: shared tasks, partial labels, RGB + grey."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medalloy.cli import main
from medalloy.data.dataset import RawDataset
from medalloy.data.io import read_label
from medalloy.data.synth import generate_dataset
from medalloy.errors import MedalloyError
from medalloy.predict import predict_cases
from medalloy.recipes.multitask import build_registry
from medalloy.recipes.universal import UniversalConfig, load_universal, train_universal

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    names = ["Dataset901_SynthMR", "Dataset902_SynthCXR", "Dataset903_SynthCXRLung", "Dataset904_SynthEndo"]
    return [generate_dataset(n, root, seed=1, cases_per_source=4, test_cases_per_source=1, progress=False) for n in names]


@pytest.fixture(scope="module")
def three(four):
    return four[1:]


@pytest.fixture(scope="module")
def run(four, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "uni"
    cfg = UniversalConfig(patch_size=64, batch_size=8, base_filters=8, max_val_cases=2, folds=4)
    cfg.train.steps, cfg.train.val_every, cfg.train.precision = 150, 75, "fp32"  # the floors below: not the CPU's bf16 units
    given = cfg.model_dump()
    res = train_universal(four, out, config=cfg, progress=False)
    assert cfg.model_dump() == given  # the caller's config is not changed (progress=False included)
    return out, res


def test_registry_shares_tasks_by_label_name(three):
    reg = build_registry([RawDataset(p) for p in three])
    assert reg.tasks == ["lung", "heart", "lesion"] and reg.null_task == 3
    assert reg.modalities == ["xr", "endoscopy", "unknown"]
    assert reg.datasets["SynthCXR"]["task_ids"] == [0, 1]
    assert reg.datasets["SynthCXRLung"]["task_ids"] == [0]  # partial labels: lung only, the same task
    assert reg.datasets["SynthEndo"]["modality_id"] == 1
    renamed = build_registry([RawDataset(three[1])], {"SynthCXRLung:lung": "lungs"})
    assert renamed.tasks == ["lungs"]


def test_universal_learns_every_dataset(run):
    out, res = run
    assert res["status"] == "done" and res["steps"] == 150
    metrics = res["best"]["metrics"]
    # every task of every dataset, label 2 (heart) and the 3D MR volumes (sliced) included; a model
    # that mixed up task ids or ignored a dataset would stay near 0 on its tasks
    expected = {
        "val/SynthMR/dice_organ": 0.2, "val/SynthMR/dice_core": 0.05, "val/SynthCXR/dice_lung": 0.7, "val/SynthCXR/dice_heart": 0.5,
        "val/SynthCXRLung/dice_lung": 0.8, "val/SynthEndo/dice_lesion": 0.5,
    }  # fmt: skip
    assert set(metrics) == set(expected) | {"val/dice"}
    low = {k: metrics[k] for k, floor in expected.items() if not metrics[k] > floor}
    assert not low, metrics
    # each dataset's share of the loss is logged (null where a logged step's batch had none of it)
    from medalloy.engine.logging import read_metrics

    train_rows = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    for name in ("SynthMR", "SynthCXR", "SynthCXRLung", "SynthEndo"):
        values = [r[f"loss/{name}"] for r in train_rows if r[f"loss/{name}"] is not None]
        assert len(values) >= len(train_rows) // 2 and all(0 < v < 5 for v in values), (name, values)
    # the MR volumes are sliced for this 2D network: each slice counts in the sampling weights (16-32
    # slices a volume), not each volume, or MR would be drawn about as often as a few X-rays
    w, n = res["dataset_weights"], res["train_cases"]
    assert w["SynthMR"] / w["SynthCXR"] > 3 * np.sqrt(n["SynthMR"] / n["SynthCXR"]) and abs(sum(w.values()) - 1) < 1e-3
    split = json.loads((out / "split.json").read_text(encoding="utf-8"))
    assert set(split["datasets"]) == {"SynthMR", "SynthCXR", "SynthCXRLung", "SynthEndo"}
    assert sorted(p.name for p in (out / "plans").iterdir()) == ["SynthCXR.json", "SynthCXRLung.json", "SynthEndo.json", "SynthMR.json"]
    net, reg, plans, record = load_universal(out / "checkpoints" / "best.safetensors")
    assert record["method"] == "universal" and record["spec"]["in_channels"] == 3 and reg.tasks == ["organ", "core", "lung", "heart", "lesion"]
    assert plans["SynthCXR"].patch_size == [64, 64] and plans["SynthCXR"].label_values == [0, 1, 2]


def test_predict_held_out_cases_per_dataset(three, run, tmp_path):
    out, _ = run
    for path, values in zip(three, ({0, 1, 2}, {0, 1}, {0, 1})):
        ds = RawDataset(path)
        ids = [c.case_id for c in ds.labelled_cases()[:2]]
        written = predict_cases(out, path, ids, tmp_path / ds.name, precision="fp32", progress=False)
        for cid, f in zip(ids, written):
            pred, truth = read_label(f)[0], read_label(ds.case(cid).label)[0]
            assert pred.shape == truth.shape and set(np.unique(pred)) <= values
            fg = truth == 1
            assert 2 * np.logical_and(pred == 1, fg).sum() / ((pred == 1).sum() + fg.sum()) > 0.5


def test_predict_folder_needs_the_dataset_of_a_multi_dataset_model(three, run, tmp_path, capsys):
    out, _ = run
    imgs = three[1] / "imagesTs"
    assert main(["-q", "predict", str(out), "--input", str(imgs), "--output", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--dataset" in err[0]
    assert main(["-q", "predict", str(out), "--input", str(imgs), "--output", str(tmp_path / "p"), "--dataset", "SynthCXRLung"]) == 0
    assert len(list((tmp_path / "p").glob("*.png"))) == len(list(imgs.glob("*.png")))
    with pytest.raises(MedalloyError, match="not trained on 'Nope'"):
        from medalloy.recipes.registry import load_checkpoint_model

        load_checkpoint_model(out / "checkpoints" / "best.safetensors", "cpu", "Nope")


def test_resume_keeps_the_task_ids_whatever_the_dataset_order(four, run, capsys):
    out, res = run
    before = (out / "checkpoints" / "last.safetensors").read_bytes()
    again = train_universal(list(reversed(four)), out, resume=True, progress=False, steps=150, val_every=75)
    assert again["tasks"] == res["tasks"] == ["organ", "core", "lung", "heart", "lesion"]
    assert [RawDataset(p).name for p in map(str, again["datasets"])] == ["SynthMR", "SynthCXR", "SynthCXRLung", "SynthEndo"]
    assert again["steps"] == 150 and (out / "checkpoints" / "last.safetensors").read_bytes() == before
    args = ["-q", "train", "universal", *map(str, four[1:]), "--out", str(out), "--resume"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "registry.json" in err[0] and "SynthMR" in err[0] and "resume with the run's datasets" in err[0]


def test_predict_per_task_masks_and_dataset_by_folder_name(three, run, tmp_path, capsys):
    out, _ = run
    cxr = three[0]
    target = tmp_path / "tasks"
    assert (
        main(["-q", "predict", str(out), "--input", str(cxr / "imagesTs"), "--output", str(target), "--task", "lung", "--task", "heart", "--precision", "fp32"])
        == 0
    )
    said = capsys.readouterr().out
    assert "of SynthCXR (inputs of" in said and "closest to SynthCXR's typical" in said  # which preprocessing and why, in one line
    for path in sorted((cxr / "labelsTs").glob("*.png")):
        truth = read_label(path)[0]
        for task, value in (("lung", 1), ("heart", 2)):
            mask = read_label(target / task / path.name)[0]
            assert set(np.unique(mask)) <= {0, 1}
            fg = truth == value
            assert 2 * np.logical_and(mask == 1, fg).sum() / (mask.sum() + fg.sum()) > 0.5, (task, path.name)
    # the training set's folder name works as well as its name
    imgs = three[1] / "imagesTs"
    assert main(["-q", "predict", str(out), "--input", str(imgs), "--output", str(tmp_path / "f"), "--dataset", "Dataset903_SynthCXRLung"]) == 0
    for args, match in (
        (["--task", "nope"], "no task 'nope'"),
        (["--task", "lesion", "--modality", "xr"], "no training dataset of modality 'xr' annotates 'lesion'"),
        (["--dataset", "Dataset999_Other"], "not trained on 'Dataset999_Other'"),
    ):
        assert main(["-q", "predict", str(out), "--input", str(imgs), "--output", str(tmp_path / "x"), *args]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], err


def test_task_masks_of_images_at_another_scale_come_from_the_training_scale(three, run, tmp_path, capsys):
    """A new site's PNGs at 2.5x the training size: resampled to the closest dataset's typical
    size they segment as the originals do; kept at their own size (--native-size) they do not."""
    from PIL import Image

    out, _ = run
    cxr = three[0]
    big = tmp_path / "big"
    big.mkdir()
    for path in sorted((cxr / "imagesTs").glob("*.png")):
        im = Image.open(path)
        im.resize((im.width * 5 // 2, im.height * 5 // 2), Image.BILINEAR).save(big / path.name)
    base = ["-q", "predict", str(out), "--task", "lung", "--precision", "fp32"]
    assert main([*base, "--input", str(cxr / "imagesTs"), "--output", str(tmp_path / "own")]) == 0
    capsys.readouterr()
    assert main([*base, "--input", str(big), "--output", str(tmp_path / "fit")]) == 0
    said = capsys.readouterr().out
    assert "fit no candidate within x1.25" in said and "each resampled to that size" in said, said
    assert main([*base, "--input", str(big), "--output", str(tmp_path / "native"), "--native-size"]) == 0
    agree = {"fit": [], "native": []}
    for path in sorted((tmp_path / "own" / "lung").glob("*.png")):
        own = read_label(path)[0]
        up = np.asarray(Image.fromarray(own.astype(np.uint8)).resize((own.shape[1] * 5 // 2, own.shape[0] * 5 // 2), Image.NEAREST)) > 0
        for how in agree:
            mask = read_label(tmp_path / how / "lung" / path.name)[0] > 0
            agree[how].append(2 * np.logical_and(mask, up).sum() / max(1, mask.sum() + up.sum()))
    # measured 0.90 against 0.54
    assert np.mean(agree["fit"]) > 0.8 and np.mean(agree["fit"]) > np.mean(agree["native"]) + 0.2, agree


def test_each_dataset_keeps_its_own_field_of_view_by_default(four, tmp_path):
    from medalloy.engine.logging import read_metrics
    from medalloy.planning.multi_dataset import PlanOptions, own_plan

    cxr, endo = four[1], four[3]
    cfg = UniversalConfig(base_filters=4, max_val_cases=1, folds=4, datasets_per_step=1, plan_options={"SynthEndo": PlanOptions(max_2d_side=64)})
    cfg.train.steps, cfg.train.val_every, cfg.train.log_every = 6, 6, 1
    out = tmp_path / "fov"
    train_universal([cxr, endo], out, config=cfg, progress=False)
    _, _, plans, _ = load_universal(out / "checkpoints" / "last.safetensors")
    for path in (cxr, endo):
        ds = RawDataset(path)
        own = own_plan(ds, cfg.dim, cfg.plan_options.get(ds.name), cfg.max_2d_side, cfg.base_filters, cfg.max_filters)
        assert plans[ds.name].patch_size == own.patch_size and plans[ds.name].batch_size == own.batch_size
    assert plans["SynthCXR"].patch_size == [112, 112] and plans["SynthEndo"].patch_size == [64, 64]  # each its own, not one shared patch
    assert plans["SynthCXR"].network == plans["SynthEndo"].network
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    # one dataset a step: exactly one dataset's loss is logged at each step
    assert len(rows) == 6 and all(sum(r[f"loss/{n}"] is not None for n in ("SynthCXR", "SynthEndo")) == 1 for r in rows)
    with pytest.raises(MedalloyError, match="plan_options names 'SynthCXRLung', not a dataset of this run"):
        train_universal([cxr, endo], tmp_path / "typo", config=cfg.model_copy(update={"plan_options": {"SynthCXRLung": PlanOptions()}}), progress=False)


def test_several_datasets_a_step_average_their_losses(four, tmp_path):
    from medalloy.engine.logging import read_metrics
    from medalloy.planning.multi_dataset import PlanOptions

    cxr, endo = four[1], four[3]
    cfg = UniversalConfig(base_filters=4, max_val_cases=1, folds=4, datasets_per_step=2, plan_options={"SynthEndo": PlanOptions(max_2d_side=64)})
    cfg.train.steps, cfg.train.val_every, cfg.train.log_every = 4, 4, 1
    train_universal([cxr, endo], tmp_path / "two", config=cfg, progress=False)
    rows = [r for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(rows) == 4
    for r in rows:  # both datasets in every step, and the step's loss is their mean (plus the modality term)
        both = (r["loss/SynthCXR"] + r["loss/SynthEndo"]) / 2
        assert r["loss"] == pytest.approx(both + cfg.modality_weight * r["loss/modality"], rel=1e-3, abs=1e-4)


def test_universal_3d_trains_on_volumes_and_predicts_by_sliding_window(four, tmp_path):
    import shutil

    mr = four[0]
    other = tmp_path / "Dataset905_SynthMRTwo"
    shutil.copytree(mr, other)
    spec = json.loads((other / "dataset.json").read_text(encoding="utf-8"))
    spec["name"] = "SynthMRTwo"
    (other / "dataset.json").write_text(json.dumps(spec), encoding="utf-8")
    cfg = UniversalConfig(dim=3, base_filters=4, max_val_cases=1, folds=4)
    cfg.train.steps, cfg.train.val_every = 4, 4
    out = tmp_path / "uni3d"
    res = train_universal([mr, other], out, config=cfg, progress=False)
    assert res["tasks"] == ["organ", "core"] and set(res["best"]["metrics"]) >= {"val/SynthMR/dice_organ", "val/SynthMRTwo/dice_core"}
    _, _, plans, _ = load_universal(out / "checkpoints" / "last.safetensors")
    assert plans["SynthMR"].dim == 3 and len(plans["SynthMR"].patch_size) == 3
    ds = RawDataset(mr)
    case = ds.labelled_cases()[0]
    written = predict_cases(out, mr, [case.case_id], tmp_path / "pred", progress=False)
    assert read_label(written[0])[0].shape == read_label(case.label)[0].shape
    with pytest.raises(MedalloyError, match="SynthCXR holds 2D images; a 3D model of several datasets needs volumes"):
        train_universal([mr, four[1]], tmp_path / "bad", config=cfg, progress=False)
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_total_loss_moves_by_the_modality_terms_weight_alone(four, tmp_path):
    # the universal total is the datasets' mean segmentation loss plus modality_weight * the modality
    # cross-entropy: a changed weight must move the total by exactly (w' - w) * that term, and no term
    from medalloy.engine.logging import read_metrics
    from medalloy.planning.multi_dataset import PlanOptions

    cxr, endo = four[1], four[3]

    def one_step(weight: float, out) -> dict:
        cfg = UniversalConfig(
            base_filters=4,
            max_val_cases=0,
            folds=4,
            datasets_per_step=2,
            batch_size=2,
            modality_weight=weight,
            plan_options={"SynthEndo": PlanOptions(max_2d_side=64)},
        )
        # lr must be > 0; the one step's logged loss is that of the weights before its update anyway
        cfg.train.steps, cfg.train.log_every, cfg.train.lr, cfg.train.precision = 1, 1, 1e-12, "fp32"
        train_universal([cxr, endo], out, config=cfg, progress=False)
        (row,) = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
        return row

    base, moved = one_step(0.01, tmp_path / "base"), one_step(0.7, tmp_path / "moved")
    assert base["loss/modality"] > 0.1 and base["loss/SynthCXR"] > 0.1 and base["loss/SynthEndo"] > 0.1, base
    for term in ("loss/modality", "loss/SynthCXR", "loss/SynthEndo"):
        assert moved[term] == pytest.approx(base[term], rel=1e-6, abs=1e-7), term
    assert moved["loss"] - base["loss"] == pytest.approx((0.7 - 0.01) * base["loss/modality"], rel=1e-5, abs=1e-6)
