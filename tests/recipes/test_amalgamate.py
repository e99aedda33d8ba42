"""Amalgamation end to end on tiny synthetic data: two frozen medalloy experts (grey and RGB)
amalgamated into one SwinUNETR model of both datasets' tasks; the experts' weights leave the
run bit-identical, the loss terms are logged, prediction works per dataset and per task, and
foreign foundation weights load with a report."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from medalloy.data.dataset import RawDataset
from medalloy.data.io import read_label
from medalloy.data.synth import generate_dataset
from medalloy.engine import checkpoint as ckpt
from medalloy.engine.logging import read_metrics
from medalloy.errors import MedalloyError
from medalloy.planning.fingerprint import fingerprint
from medalloy.planning.planner import plan_dataset
from medalloy.predict import predict_cases
from medalloy.recipes.amalgamate import AmalgamateConfig, train_amalgamate
from medalloy.recipes.expert import ExpertConfig, train_expert
from medalloy.recipes.registry import load_checkpoint_tasks

pytestmark = pytest.mark.slow
pytest.importorskip("einops")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return [
        generate_dataset(n, root, seed=3, cases_per_source=4, test_cases_per_source=1, progress=False)
        for n in ("Dataset902_SynthCXR", "Dataset904_SynthEndo", "Dataset903_SynthCXRLung")
    ]


@pytest.fixture(scope="module")
def experts(data, tmp_path_factory):
    runs = []
    for path in data:
        ds = RawDataset(path)
        plan = plan_dataset(ds, fingerprint(ds, progress=False), max_2d_side=64, base_filters=8).model_copy(update={"batch_size": 4})
        cfg = ExpertConfig(folds=4, max_val_cases=1)
        cfg.train.steps, cfg.train.val_every = 30, 30
        out = tmp_path_factory.mktemp("runs") / f"expert-{ds.name}"
        train_expert(path, out, plan=plan, config=cfg, progress=False)
        runs.append(out)
    return runs


def _cfg(steps: int = 16, **kw) -> AmalgamateConfig:
    cfg = AmalgamateConfig(folds=4, max_val_cases=1, max_2d_side=64, width=32, batch_size=4, **kw)
    cfg.train.steps, cfg.train.val_every, cfg.train.log_every = steps, steps, 5
    return cfg


def test_amalgamation_trains_with_frozen_experts_and_predicts(data, experts, tmp_path):
    data, experts = data[:2], experts[:2]
    out = tmp_path / "ka"
    res = train_amalgamate(data, experts, out, config=_cfg(), progress=False)
    assert res["tasks"] == ["lung", "heart", "lesion"] and len(res["experts"]) == 2
    assert res["trainable_params"] < res["params"]  # the experts are inside, frozen
    tensors, record = ckpt.load_checkpoint(out / "checkpoints" / "best.safetensors")
    assert record["kd_pairs"] == {"SynthCXR": 0, "SynthEndo": 1}
    assert record["spec"]["task_experts"] == [[[0, 1]], [[0, 2]], [[1, 1]]]  # lung, heart: the CXR expert's classes 1, 2; lesion: the endoscopy expert's
    for k, run in enumerate(experts):  # the experts' weights come out of training bit-identical
        own = ckpt.group(ckpt.load_checkpoint(run / "checkpoints" / "best.safetensors")[0], "model/net")
        prefix = f"experts.experts.{k}."
        kept = {n[len(prefix) :]: v for n, v in ckpt.group(tensors, "model/net").items() if n.startswith(prefix)}
        assert own.keys() == kept.keys() and all(torch.equal(own[n], kept[n]) for n in own)
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    for part in ("seg", "kd_logits", "kd_features"):
        assert all(np.isfinite(r[f"loss/{part}"]) for r in rows if f"loss/{part}" in r), part
    assert any(r.get("loss/kd_logits", 0) > 0 for r in rows) and any(r.get("loss/kd_features", 0) > 0 for r in rows)
    both = [r for r in rows if np.isfinite(r.get("loss/SynthCXR", np.nan)) and np.isfinite(r.get("loss/SynthEndo", np.nan))]
    assert len(both) == len(rows)  # two datasets a step (the default): every logged step saw both

    for path in data:
        ds = RawDataset(path)
        case = ds.labelled_cases()[0]
        written = predict_cases(out, path, [case.case_id], tmp_path / f"pred-{ds.name}", progress=False)
        label = read_label(written[0])[0]
        assert label.shape == read_label(case.label)[0].shape and set(np.unique(label)) <= set(ds.spec.labels.values())
    model, plan, _, note = load_checkpoint_tasks(out / "checkpoints" / "best.safetensors", ["lesion"])
    assert plan.in_channels == 3 and "SynthEndo" in note
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 64, 64)
    with pytest.raises(MedalloyError, match="no task 'liver'"):
        load_checkpoint_tasks(out / "checkpoints" / "best.safetensors", ["liver"])


def test_expert_links_follow_datasets_and_label_values():
    from medalloy.recipes.amalgamate import expert_links
    from medalloy.recipes.multitask import TaskRegistry

    registry = TaskRegistry(
        tasks=["lung", "heart", "polyp"],
        modalities=["xray", "unknown"],
        datasets={
            "A": {"task_ids": [0, 1], "labels": {"lung": 1, "heart": 2}},
            "B": {"task_ids": [0], "labels": {"lung": 1}},
            "C": {"task_ids": [2], "labels": {"polyp": 1}},
        },
    )
    experts = [
        {"dataset": "A", "label_values": [0, 2, 1]},  # channels in its own order: heart is class 1, lung class 2
        {"dataset": "B", "label_values": [0, 1]},
        {"dataset": "C", "label_values": [0, 255]},  # renumbered labels: no pair (the recipe warns)
        {"dataset": None, "label_values": [0, 1]},  # trained elsewhere: teaches features only
        {"dataset": "B", "label_values": [0, 1]},  # a second expert of B: priors, but neither teacher nor router target
    ]
    links = expert_links(experts, registry)
    assert links.task == [[(0, 2), (1, 1), (4, 1)], [(0, 1)], []]
    # A's expert has A's labels in another channel order: no logit teacher for A
    assert links.teacher == {"B": 1} and links.own == {"A": 0, "B": 1, "C": 2}


def test_experts_sharing_a_task_are_routed(data, experts, tmp_path):
    # SynthCXR (lung, heart) and SynthCXRLung (lung) share "lung": its prior weighs both experts per image
    out = tmp_path / "routed"
    train_amalgamate([data[0], data[2]], [experts[0], experts[2]], out, config=_cfg(steps=10), progress=False)
    tensors, record = ckpt.load_checkpoint(out / "checkpoints" / "last.safetensors")
    assert record["spec"]["task_experts"] == [[[0, 1], [1, 1]], [[0, 2]]] and record["spec"]["route"] is True
    assert "router.weight" in ckpt.group(tensors, "model/net")
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert all(r["loss/route"] > 0 and np.isfinite(r["loss/route"]) for r in rows)
    case = RawDataset(data[2]).labelled_cases()[0]
    written = predict_cases(out, data[2], [case.case_id], tmp_path / "pred-routed", checkpoint="last", progress=False)
    assert set(np.unique(read_label(written[0])[0])) <= {0, 1}


def test_foundation_weights_file_and_ablations(data, experts, tmp_path):
    from medalloy.models.swin import build_swinunetr

    torch.manual_seed(1)
    donor = build_swinunetr(2, 1, 12)  # SynthCXR is grey
    weights = tmp_path / "swin.safetensors"
    save_file({"module." + k: v.contiguous() for k, v in donor.state_dict().items()}, str(weights))
    res = train_amalgamate(
        data[:1], experts[:1], tmp_path / "flat", config=_cfg(steps=2, hierarchical=False, decoder="plain", foundation=str(weights)), progress=False
    )
    assert (
        "tensors loaded, 0 missing, 2 unexpected" in res["foundation_init"] and "another shape" not in res["foundation_init"]
    )  # unexpected: SwinUNETR's output layer
    alone = train_amalgamate(data[:1], [], tmp_path / "alone", config=_cfg(steps=2, decoder="plain", stages=[]), progress=False)
    assert alone["trainable_params"] == alone["params"] and alone["experts"] == []
    # the foundation alone as the start of an amalgamation
    res = train_amalgamate(data[:1], experts[:1], tmp_path / "from-run", config=_cfg(steps=2, foundation=str(tmp_path / "alone")), progress=False)
    assert "0 missing" in res["foundation_init"]


def test_bad_experts_are_refused_before_writing(data, experts, tmp_path):
    with pytest.raises(MedalloyError, match="no best checkpoint"):
        train_amalgamate(data, [tmp_path / "nothing"], tmp_path / "bad", config=_cfg(), progress=False)
    assert not (tmp_path / "bad").exists()


def test_cli_trains_the_foundation_alone_and_predicts_per_task(data, tmp_path, capsys):
    from medalloy.cli import main

    out = tmp_path / "alone"
    args = ["-q", "amalgamate", str(data[0]), "--out", str(out), "--steps", "2", "--decoder", "plain", "--stages", "none", "--batch-size", "2"]
    assert main(args) == 0
    assert "0 frozen experts" in capsys.readouterr().out
    target = tmp_path / "masks"
    assert main(["-q", "predict", str(out), "--input", str(data[0] / "imagesTs"), "--output", str(target), "--task", "heart"]) == 0
    assert sorted(p.name for p in (target / "heart").iterdir())
    assert main(["-q", "predict", str(out), "--input", str(data[0] / "imagesTs"), "--output", str(tmp_path / "x"), "--task", "liver"]) == 1
    assert "no task 'liver'" in capsys.readouterr().err


def _one_step_row(data, experts, out, **weights) -> dict:
    cfg = _cfg(steps=1, **weights)
    cfg.batch_size, cfg.max_val_cases = 2, 0
    # lr must be > 0; the logged loss of the one step is that of the weights before its update anyway
    cfg.train.log_every, cfg.train.lr, cfg.train.precision = 1, 1e-12, "fp32"
    train_amalgamate(data, experts, out, config=cfg, progress=False)
    (row,) = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    return row


def test_total_loss_is_the_weighted_sum_of_its_terms(data, experts, tmp_path):
    # SynthCXR + SynthCXRLung with their own experts: each dataset has a logit teacher, merged tokens
    # and (sharing "lung") a router target, so every term is live; two datasets a step (the default)
    # average each term over both. Changing one weight must move the total by exactly
    # (w' - w) * that term as logged (unweighted); the terms themselves must not move.
    pair, pair_experts = [data[0], data[2]], [experts[0], experts[2]]
    base_w = {"kd_logits": 1.0, "kd_features": 0.1, "route_weight": 1.0}
    terms = {"kd_logits": "loss/kd_logits", "kd_features": "loss/kd_features", "route_weight": "loss/route"}
    base = _one_step_row(pair, pair_experts, tmp_path / "base", **base_w)
    assert all(base[t] > 0.01 for t in terms.values()) and base["loss/seg"] > 0.1, base
    # segmentation has no weight of its own: it enters the total once
    assert base["loss"] == pytest.approx(base["loss/seg"] + sum(w * base[terms[k]] for k, w in base_w.items()), rel=1e-6, abs=1e-6)
    for key, new_w in (("kd_logits", 2.5), ("kd_features", 1.1), ("route_weight", 0.25)):
        row = _one_step_row(pair, pair_experts, tmp_path / key, **{**base_w, key: new_w})
        for t in ("loss/seg", *terms.values()):
            assert row[t] == pytest.approx(base[t], rel=1e-6, abs=1e-7), (key, t)
        assert row["loss"] - base["loss"] == pytest.approx((new_w - base_w[key]) * base[terms[key]], rel=1e-5, abs=1e-6), key
