"""Image-report pretraining end to end on synthetic pairs: both stages, the frozen teacher, the
record, zero-shot / caption commands, and an expert started from the encoder (--init)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from medalloy.cli import main
from medalloy.data.synth import generate_dataset
from medalloy.data.synth_reports import CLASSES, generate_report_pairs
from medalloy.engine import checkpoint as ckpt
from medalloy.errors import MedalloyError
from medalloy.models.unet import build_unet
from medalloy.planning.plan import load_plan
from medalloy.recipes import scaffold
from medalloy.recipes.expert import train_expert
from medalloy.recipes.pretrain import PretrainConfig, load_pretrained, pretrain

pytestmark = pytest.mark.slow

TINY = {"image_size": 32, "batch_size": 8, "summarize_steps": 6, "steps": 8, "val_every": 4}


def tiny_config(**kw) -> PretrainConfig:
    kw.setdefault("text_encoder", "scratch")  # MiniLM (the text extra) has its own test; this one stays small
    return PretrainConfig(width=32, embed_dim=16, text_layers=1, decoder_layers=1, heads=2, max_findings_len=48, max_impression_len=16, **kw)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return generate_report_pairs(tmp_path_factory.mktemp("reports"), n_cases=24, text_only=24, size=64, progress=False)


@pytest.fixture(scope="module")
def hybrid_run(pairs, tmp_path_factory):
    """A full HybridMED run; the specs the recipe hands the engine are kept for inspection."""
    specs = []
    original = scaffold.Run.train

    def keep(self, spec, cfg, stage=None, resume=None):
        frozen = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in spec.models.items() if n not in spec.trainable}
        specs.append((spec, frozen))
        return original(self, spec, cfg, stage=stage, resume=resume)

    scaffold.Run.train = keep
    try:
        out = tmp_path_factory.mktemp("runs") / "hybrid"
        result = pretrain(pairs / "pairs.csv", out, text_only=pairs / "reports.csv", config=tiny_config(), progress=False, seed=0, **TINY)
    finally:
        scaffold.Run.train = original
    return out, result, specs


def test_two_stages_and_record(hybrid_run):
    out, result, specs = hybrid_run
    assert result["status"] == "done" and result["steps"] == 8 and result["summarize"]["steps"] == 6
    assert result["text_encoder"] == "scratch" and result["text_only_pairs"] == 24
    assert result["train_pairs"] + result["val_pairs"] == 24 and result["val_pairs"] > 0
    for name in (
        "run.json",
        "plan.json",
        "config.yaml",
        "split.json",
        "tokenizer.json",
        "metrics.jsonl",
        "summarize/metrics.jsonl",
        "summarize/checkpoints/best.safetensors",
    ):
        assert (out / name).exists(), name
    split = json.loads((out / "split.json").read_text())
    assert not set(split["train"]) & set(split["val"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_keys = set().union(*(r for r in rows if r["kind"] == "train"))
    assert {"global", "token", "summary", "caption", "distill"} <= train_keys
    record = ckpt.read_record(out / "checkpoints" / "best.safetensors")
    assert record["method"] == "pretrain" and record["losses"] == ["global", "token", "generation"]
    assert record["plan"]["patch_size"] == [32, 32] and record["text_encoder"] == "scratch"
    stage1, _ = specs[0]
    assert stage1.monitor == "val/summary" and stage1.trainable == ["model"]


def test_stage2_teacher_is_stage1_frozen(hybrid_run):
    out, _, specs = hybrid_run
    spec, frozen_before = specs[1]
    assert "teacher" in spec.models and "teacher" not in spec.trainable
    stage1 = ckpt.group(ckpt.load_checkpoint(out / "summarize" / "checkpoints" / "best.safetensors")[0], "model/model")
    after = {k: v.cpu() for k, v in spec.models["teacher"].state_dict().items()}  # on the GPU where one trained
    for k, v in stage1.items():
        assert torch.equal(frozen_before["teacher"][k].cpu(), v), k  # the teacher is the stage-1 model ...
        assert torch.equal(after[k], v), k  # ... and still bit-identical after stage 2's steps
    trained = ckpt.group(ckpt.load_checkpoint(out / "checkpoints" / "last.safetensors")[0], "model/model")
    changed = [k for k in stage1 if "decoder.layers.0.cross_attn.caption" in k and not torch.equal(trained[k], stage1[k])]
    assert changed  # while the student's captioning branch learnt


def test_arm_without_generation_skips_stage1(pairs, tmp_path):
    res = pretrain(pairs / "pairs.csv", tmp_path / "g", config=tiny_config(), progress=False, losses=["global"], **TINY)
    assert res["summarize"] is None and not (tmp_path / "g" / "summarize").exists()
    rows = [json.loads(line) for line in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert "global" in rows[-1] and "token" not in rows[-1] and "caption" not in rows[-1]
    with pytest.raises(MedalloyError, match="no generation decoder"):
        from medalloy.radiograph_tasks import caption

        caption(tmp_path / "g", pairs / "images", tmp_path / "c.csv", progress=False)


def test_zeroshot_and_caption_commands(hybrid_run, pairs, tmp_path, capsys):
    out, _, _ = hybrid_run
    zs, cap = tmp_path / "zs.csv", tmp_path / "cap.csv"
    assert main(["-q", "zeroshot", str(out), "--images", str(pairs / "images"), "--classes", ",".join(CLASSES), "--output", str(zs)]) == 0
    rows = list(csv.DictReader(zs.open()))
    assert len(rows) == 24 and set(rows[0]) == {"image", "predicted", *CLASSES}
    for r in rows:
        probs = [float(r[c]) for c in CLASSES]
        assert abs(sum(probs) - 1) < 1e-3 and r["predicted"] == CLASSES[int(np.argmax(probs))]
    assert main(["-q", "caption", str(out), "--images", str(pairs / "images"), "--output", str(cap)]) == 0
    caps = list(csv.DictReader(cap.open()))
    assert len(caps) == 24 and all(set(c) == {"image", "impression"} for c in caps)
    assert main(["-q", "zeroshot", str(out), "--images", str(pairs / "images"), "--classes", "COVID-19"]) == 1
    assert "at least two classes" in capsys.readouterr().err


def test_load_pretrained_gives_the_trained_weights(hybrid_run):
    out, _, _ = hybrid_run
    model, enc_tok, dec_tok, record = load_pretrained(out)
    saved = ckpt.group(ckpt.load_checkpoint(out / "checkpoints" / "best.safetensors")[0], "model/model")
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert enc_tok is dec_tok and dec_tok.vocab_size == record["model"]["vocab_size"]
    assert 0.0 < record["temperature"] < 1.0


def test_expert_starts_from_the_pretrained_encoder(hybrid_run, tmp_path):
    out, _, _ = hybrid_run
    data = generate_dataset("Dataset902_SynthCXR", tmp_path / "d", seed=2, cases_per_source=3, test_cases_per_source=0, progress=False)
    pre = ckpt.group(ckpt.load_checkpoint(out / "checkpoints" / "best.safetensors")[0], "model/model")
    res = train_expert(data, tmp_path / "e", init=out, steps=1, val_every=1, progress=False, seed=0, batch_size=2)
    assert res["init"]["method"] == "pretrain"
    plan = load_plan(tmp_path / "e" / "plan.json")
    assert plan.network.filters == load_plan(out / "plan.json").network.filters  # the encoder's network, adopted
    # the network that trained started from the pretrained encoder: rebuild it and load --init the same way
    from medalloy.models.image_encoder import load_encoder_into
    from medalloy.recipes.init_weights import read_init_encoder

    net = build_unet(plan)
    load_encoder_into(net, read_init_encoder(out).state, out)
    for k, v in net.state_dict().items():
        if k.split(".")[0] in ("input_block", "downsamples", "bottleneck"):
            assert torch.equal(v, pre["image." + k]), k


def test_expert_with_a_plan_that_does_not_fit_is_refused(hybrid_run, tmp_path):
    out, _, _ = hybrid_run
    data = generate_dataset("Dataset902_SynthCXR", tmp_path / "d", seed=2, cases_per_source=3, test_cases_per_source=0, progress=False)
    from medalloy.planning.planner import plan_images_2d

    other = plan_images_2d(64).model_copy(update={"label_values": [0, 1, 2], "labels": {"background": 0, "lung": 1, "heart": 2}})
    with pytest.raises(MedalloyError, match=r"stage '(enc\d|bottleneck)'"):
        train_expert(data, tmp_path / "e", init=out, plan=other, steps=1, progress=False)
    with pytest.raises(MedalloyError, match="holds no U-Net encoder|not found"):
        train_expert(data, tmp_path / "e2", init=tmp_path / "nothing.safetensors", steps=1, progress=False)
    assert not (tmp_path / "e2").exists()  # refused before the run folder was made


def test_too_few_pairs_and_bad_columns(pairs, tmp_path, capsys):
    few = tmp_path / "few.csv"
    with open(pairs / "pairs.csv", newline="") as f:
        lines = f.read().splitlines()
    few.write_text("\n".join(lines[:3]) + "\n")
    (tmp_path / "images").symlink_to(pairs / "images")
    with pytest.raises(MedalloyError, match="too few"):
        pretrain(few, tmp_path / "r", progress=False, **TINY)
    assert main(["-q", "pretrain", "--pairs", str(pairs / "pairs.csv"), "--out", str(tmp_path / "r2"), "--findings-column", "notes"]) == 1
    err = capsys.readouterr().err
    assert "pairs.csv" in err and "'notes'" in err and err.count("\n") == 1  # one line naming the file and the column
    assert not (tmp_path / "r2").exists()


def test_empty_reports_stop_or_are_skipped_and_counted(pairs, tmp_path, capsys):
    rows = list(csv.DictReader((pairs / "pairs.csv").open(newline="")))
    rows[3]["impression"] = "  "
    bad = tmp_path / "pairs.csv"
    with bad.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, "image": str(pairs / r["image"])} for r in rows)
    args = ["-q", "pretrain", "--pairs", str(bad), "--out", str(tmp_path / "r"), "--losses", "global", "--image-size", "32", "--steps", "2", "--text-encoder", "scratch"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "line 5" in err and "empty impression" in err and not (tmp_path / "r").exists()
    assert main([*args, "--skip-empty"]) == 0
    res = json.loads((tmp_path / "r" / "run.json").read_text())
    assert res["skipped"] == {"empty impression": 1} and res["train_pairs"] + res["val_pairs"] == 23
    assert "rows skipped: 1 empty impression" in capsys.readouterr().out


def test_token_scope_pair_from_the_cli(pairs, tmp_path):
    from medalloy.recipes.pretrain import Objective

    out = tmp_path / "pair"
    argv = ["pretrain", "--pairs", str(pairs / "pairs.csv"), "--out", str(out), "--losses", "token", "--token-scope", "pair", "--text-encoder", "scratch"]
    assert main(["--quiet", *argv, "--image-size", "32", "--batch-size", "8", "--steps", "2"]) == 0
    cfg = PretrainConfig.model_validate(__import__("yaml").safe_load((out / "config.yaml").read_text()))
    assert cfg.token_scope == "pair" and Objective(cfg, pad_id=0).token.scope == "pair"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert np.isfinite(rows[-1]["token"]) and "global" not in rows[-1]
    assert Objective(tiny_config(), pad_id=0).token.scope == "batch"
