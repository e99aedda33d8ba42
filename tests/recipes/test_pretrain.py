"""Image-report pretraining end to end on synthetic pairs: both stages, the frozen teacher, the
record (which text encoder ran), zero-shot / caption / probe / retrieve commands, and an expert
started from the encoder (--init)."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from medalloy.cli import main
from medalloy.data.radiograph import load_radiograph
from medalloy.data.reports import ReportColumns, read_report_pairs, split_by_patient
from medalloy.data.synth import generate_dataset
from medalloy.data.synth_reports import CLASSES, generate_report_pairs
from medalloy.engine import checkpoint as ckpt
from medalloy.engine.linear_probe import linear_probe
from medalloy.engine.logging import read_metrics
from medalloy.errors import MedalloyError
from medalloy.models import text_encoder as te
from medalloy.models.unet import build_unet
from medalloy.planning.plan import load_plan
from medalloy.recipes import scaffold
from medalloy.recipes.expert import train_expert
from medalloy.recipes.pretrain import PretrainConfig, _text_encoder_kind, load_pretrained, pretrain
from medalloy.seeding import seed_everything

pytestmark = pytest.mark.slow

TINY = {"image_size": 32, "batch_size": 8, "summarize_steps": 6, "steps": 8, "val_every": 4}


def tiny_config(**kw) -> PretrainConfig:
    kw.setdefault("text_encoder", "scratch")  # MiniLM (the text extra) has its own test; this one stays small
    return PretrainConfig(width=32, embed_dim=16, text_layers=1, decoder_layers=1, heads=2, max_findings_len=48, max_impression_len=16, **kw)


def write_pairs(rows: list[dict], pairs, path):
    """``rows`` of the synthetic pairs CSV written to ``path``, image paths made absolute."""
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, "image": str(pairs / r["image"])} for r in rows)
    return path


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
    split = json.loads((out / "split.json").read_text())["datasets"]["pairs"]
    assert not set(split["train"]) & set(split["val"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_keys = set().union(*(r for r in rows if r["kind"] == "train"))
    assert {"loss/global", "loss/token", "loss/summary", "loss/caption", "loss/distill"} <= train_keys
    record = ckpt.read_record(out / "checkpoints" / "best.safetensors")
    assert record["method"] == "pretrain" and record["losses"] == ["global", "token", "generation"]
    assert record["plan"]["patch_size"] == [32, 32] and record["spec"]["text_encoder"] == "scratch"
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
    assert "loss/global" in rows[-1] and "loss/token" not in rows[-1] and "loss/caption" not in rows[-1]
    with pytest.raises(MedalloyError, match="no generation decoder"):
        from medalloy.radiograph_tasks import caption

        caption(tmp_path / "g", pairs / "images", tmp_path / "c.csv", progress=False)


@pytest.mark.parametrize(("stage1_seconds", "stage2_minutes"), [(60.0, 9.0), (150.0, 8.0)])
def test_the_time_budget_is_the_whole_runs(pairs, tmp_path, monkeypatch, stage1_seconds, stage2_minutes):
    """Stage 1 gets its share of the budget, stage 2 what stage 1 left and at least its own share
    (stage 1's seconds come from a virtual clock: the summary the engine returns is rewritten)."""
    given, original = [], scaffold.Run.train

    def clocked(self, spec, cfg, stage=None, resume=None):
        given.append((stage, cfg.time_budget_minutes))
        summary = original(self, spec, cfg, stage=stage, resume=resume)
        return {**summary, "seconds": stage1_seconds} if stage else summary

    monkeypatch.setattr(scaffold.Run, "train", clocked)
    pretrain(pairs / "pairs.csv", tmp_path / "b", config=tiny_config(summarize_budget_fraction=0.2), progress=False, time_budget_minutes=10, **TINY)
    assert given == [("summarize", pytest.approx(2.0)), (None, pytest.approx(stage2_minutes))]


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
    assert enc_tok is dec_tok and dec_tok.vocab_size == record["spec"]["vocab_size"]
    assert 0.0 < record["temperature"] < 1.0


def test_expert_starts_from_the_pretrained_encoder(hybrid_run, tmp_path, monkeypatch):
    out, _, _ = hybrid_run
    data = generate_dataset("Dataset902_SynthCXR", tmp_path / "d", seed=2, cases_per_source=3, test_cases_per_source=0, progress=False)
    pre = ckpt.group(ckpt.load_checkpoint(out / "checkpoints" / "best.safetensors")[0], "model/model")
    started = {}  # the network's weights as the engine receives it, before its first step
    original = scaffold.Run.train

    def keep(self, spec, cfg, stage=None, resume=None):
        started.update({k: v.detach().cpu().clone() for k, v in spec.models["net"].state_dict().items()})
        return original(self, spec, cfg, stage=stage, resume=resume)

    monkeypatch.setattr(scaffold.Run, "train", keep)
    res = train_expert(data, tmp_path / "e", init=out, steps=1, val_every=1, progress=False, seed=0, batch_size=2)
    assert res["init"]["method"] == "pretrain"
    plan = load_plan(tmp_path / "e" / "plan.json")
    assert plan.network.filters == load_plan(out / "plan.json").network.filters  # the encoder's network, adopted
    encoder = [k for k in started if k.split(".")[0] in ("input_block", "downsamples", "bottleneck")]
    assert len(encoder) == 2 * len(plan.network.filters) and all("image." + k in pre for k in encoder)  # two convolutions a stage
    for k in encoder:
        assert torch.equal(started[k], pre["image." + k]), k  # the expert trained from the pretrained encoder ...
    seed_everything(0)
    fresh = build_unet(plan.network, plan.in_channels, plan.num_classes).state_dict()
    assert not any(torch.equal(fresh[k], started[k]) for k in encoder if k.endswith("conv.weight"))  # ... not from its own random init
    assert not any(k.split(".")[0] in ("input_block", "downsamples", "bottleneck") for k in set(fresh) - set(started))


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
    assert main(["-q", "train", "pretrain", "--pairs", str(pairs / "pairs.csv"), "--out", str(tmp_path / "r2"), "--findings-column", "notes"]) == 1
    err = capsys.readouterr().err
    assert "pairs.csv" in err and "'notes'" in err and err.count("\n") == 1  # one line naming the file and the column
    assert not (tmp_path / "r2").exists()


def test_empty_reports_stop_or_are_skipped_and_counted(pairs, tmp_path, capsys):
    rows = list(csv.DictReader((pairs / "pairs.csv").open(newline="")))
    rows[3]["impression"] = "  "
    bad = write_pairs(rows, pairs, tmp_path / "pairs.csv")
    args = [
        "-q",
        "pretrain",
        "--pairs",
        str(bad),
        "--out",
        str(tmp_path / "r"),
        "--losses",
        "global",
        "--image-size",
        "32",
        "--steps",
        "2",
        "--text-encoder",
        "scratch",
    ]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "line 5" in err and "empty impression" in err and not (tmp_path / "r").exists()
    assert main([*args, "--skip-empty"]) == 0
    res = json.loads((tmp_path / "r" / "run.json").read_text())
    assert res["skipped"] == {"empty impression": 1} and res["train_pairs"] + res["val_pairs"] == 23
    assert "rows skipped: 1 empty impression" in capsys.readouterr().out


def test_token_scope_pair_from_the_cli(pairs, tmp_path):
    from medalloy.recipes.pretrain import objective_of

    out = tmp_path / "pair"
    argv = ["pretrain", "--pairs", str(pairs / "pairs.csv"), "--out", str(out), "--losses", "token", "--token-scope", "pair", "--text-encoder", "scratch"]
    assert main(["--quiet", *argv, "--image-size", "32", "--batch-size", "8", "--steps", "2"]) == 0
    cfg = PretrainConfig.model_validate(__import__("yaml").safe_load((out / "config.yaml").read_text()))
    assert cfg.token_scope == "pair" and objective_of(cfg, pad_id=0).token.scope == "pair"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert np.isfinite(rows[-1]["loss/token"]) and "loss/global" not in rows[-1]
    assert objective_of(tiny_config(), pad_id=0).token.scope == "batch"


def test_probe_and_retrieve_commands(hybrid_run, pairs, tmp_path, capsys):
    out, _, _ = hybrid_run
    table = read_report_pairs(pairs / "pairs.csv", ReportColumns(label="finding"))
    train, test = split_by_patient(table.pairs, 0.25, seed=0)
    model, enc_tok, _, record = load_pretrained(out)
    size = record["plan"]["patch_size"][0]
    with torch.inference_mode():
        x = torch.from_numpy(np.stack([load_radiograph(p.image, size) for p in table.pairs]))
        pooled = model.image(x)[-1].mean(dim=(2, 3)).double()  # the encoder's pooled bottleneck, as the benchmark probes it
        glob = torch.nn.functional.normalize(model.image_features(x)[0].double(), dim=-1)
        ids, mask = enc_tok.encode([p.impression for p in table.pairs], record["spec"]["max_impression_len"])
        txt = torch.nn.functional.normalize(model.text_features(ids, mask)[0].double(), dim=-1)

    # linear probe: patient-level split, 1 / 10 / 100 % of the training labels, accuracy and balanced accuracy
    path = tmp_path / "probe.json"
    assert main(["-q", "probe", str(out), "--pairs", str(pairs / "pairs.csv"), "--output", str(path)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(path.read_text())
    assert res["label_column"] == "finding" and res["classes"] == sorted(CLASSES)
    assert res["test_patients"] == sorted({p.patient for p in test}) and (res["train_images"], res["test_images"]) == (len(train), len(test)) == (18, 6)
    counts = Counter(p.label for p in train)
    assert [s["labels"] for s in res["scores"]] == [4, sum(max(1, round(0.1 * n)) for n in counts.values()), 18]  # at least one a class
    test_y = np.array([p.label for p in test])
    top = max(sorted(set(test_y)), key=list(test_y).count)
    assert res["majority"] == {"class": top, "accuracy": pytest.approx(np.mean(test_y == top)), "balanced_accuracy": pytest.approx(1 / len(set(test_y)))}
    row = {p.row: i for i, p in enumerate(table.pairs)}
    tr_x, te_x = pooled[[row[p.row] for p in train]], pooled[[row[p.row] for p in test]]
    train_y = np.array([p.label for p in train])
    for s, fraction in zip(res["scores"], (0.01, 0.1, 1.0)):
        assert s["fraction"] == fraction
        assert s["accuracy"] == pytest.approx(linear_probe(tr_x, train_y, te_x, test_y, fraction, seed=0), abs=1e-9)
        assert s["balanced_accuracy"] == pytest.approx(linear_probe(tr_x, train_y, te_x, test_y, fraction, seed=0, balanced=True), abs=1e-9)
    assert "1 % of the labels (4): accuracy" in printed and "10 % of the labels" in printed and "100 % of the labels (18)" in printed
    own = tmp_path / "own.json"  # --patient-column none: every row its own patient
    assert main(["-q", "probe", str(out), "--pairs", str(pairs / "pairs.csv"), "--patient-column", "none", "--fractions", "1.0", "--output", str(own)]) == 0
    res = json.loads(own.read_text())
    assert len(res["test_patients"]) == res["test_images"] == 6 and all(p.startswith("row") for p in res["test_patients"])
    assert [s["fraction"] for s in res["scores"]] == [1.0]

    # retrieval: Recall@k both ways over every pair, an identical impression counting as the pair's own
    path = tmp_path / "retrieval.json"
    assert main(["-q", "retrieve", str(out), "--pairs", str(pairs / "pairs.csv"), "--k", "10", "1", "5", "24", "--output", str(path)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(path.read_text())
    keys = np.array([" ".join(p.impression.lower().split()) for p in table.pairs])
    assert res["pairs_scored"] == 24 and res["distinct_impressions"] == len(set(keys)) and res["ks"] == [1, 5, 10, 24]
    sims = (glob @ txt.t()).numpy()
    for way, s in (("image_to_text", sims), ("text_to_image", sims.T)):
        ranked = keys[np.argsort(-s, axis=1, kind="stable")]
        for k in (1, 5, 10):
            assert res[way][f"r{k}"] == pytest.approx(np.mean([keys[i] in ranked[i, :k] for i in range(24)])), (way, k)
        assert res[way]["r24"] == 1.0
    assert "image -> text: R@1" in printed and "text -> image: R@1" in printed and "R@10" in printed


def test_probe_and_retrieve_errors_are_one_line(hybrid_run, pairs, tmp_path, capsys):
    out, _, _ = hybrid_run
    csv_path = str(pairs / "pairs.csv")
    expert = ckpt.save_checkpoint(tmp_path / "expert.safetensors", {"w": torch.zeros(1)}, {"method": "expert"})

    def error(*argv: str) -> str:
        assert main(["-q", *argv, "--output", str(tmp_path / "o.json")]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("medalloy: error: ")
        return err

    for command in ("probe", "retrieve"):
        err = error(command, str(out), "--pairs", str(tmp_path / "nothing.csv"))
        assert "nothing.csv" in err and "not found" in err
        err = error(command, str(out), "--pairs", csv_path, "--impression-column", "summary")
        assert "pairs.csv" in err and "'summary'" in err and "--impression-column" in err
        err = error(command, str(expert), "--pairs", csv_path)
        assert "expert.safetensors" in err and "not 'pretrain'" in err
        err = error(command, str(tmp_path), "--pairs", csv_path)
        assert "no checkpoints/best.safetensors" in err
    err = error("probe", str(out), "--pairs", csv_path, "--label-column", "diagnosis")
    assert "'diagnosis' (label)" in err and "--label-column" in err
    assert "--fractions" in error("probe", str(out), "--pairs", csv_path, "--fractions", "0", "0.5")
    assert "--test-fraction" in error("probe", str(out), "--pairs", csv_path, "--test-fraction", "1")
    assert "--k" in error("retrieve", str(out), "--pairs", csv_path, "--k", "0")
    rows = list(csv.DictReader((pairs / "pairs.csv").open(newline="")))
    rows[5]["finding"] = ""
    unlabelled = write_pairs(rows, pairs, tmp_path / "unlabelled.csv")
    err = error("probe", str(out), "--pairs", str(unlabelled))
    assert "line 7" in err and "empty label" in err and "'finding'" in err
    assert not (tmp_path / "o.json").exists()


def _without(monkeypatch, package: str) -> None:
    """As if ``package`` were not installed."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **kw: None if name == package else real(name, *a, **kw))


def test_auto_text_encoder_falls_back_to_scratch_without_the_extra_and_says_so(pairs, tmp_path, monkeypatch):
    auto = tiny_config(text_encoder="auto")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "transformers", None)  # the weights' package without transformers: import fails
        assert _text_encoder_kind(auto) == "scratch"
    _without(monkeypatch, te.MINILM_PACKAGE)
    assert _text_encoder_kind(auto) == "scratch"
    with pytest.raises(MedalloyError, match=r"medalloy\[text\]"):  # asked for by name: refused, before the run folder
        pretrain(pairs / "pairs.csv", tmp_path / "m", config=tiny_config(text_encoder="minilm"), progress=False, **TINY)
    assert not (tmp_path / "m").exists()
    out = tmp_path / "auto"
    res = pretrain(pairs / "pairs.csv", out, config=auto, progress=False, losses=["global"], **{**TINY, "steps": 2, "val_every": 2})
    assert res["text_encoder"] == "scratch" and json.loads((out / "run.json").read_text())["text_encoder"] == "scratch"
    assert __import__("yaml").safe_load((out / "config.yaml").read_text())["text_encoder"] == "auto"  # what was asked; run.json: what ran
    assert ckpt.read_record(out / "checkpoints" / "best.safetensors")["spec"]["text_encoder"] == "scratch"
    model, enc_tok, dec_tok, _ = load_pretrained(out)
    assert isinstance(model.text, te.ScratchTextEncoder) and enc_tok is dec_tok  # the recorded encoder is the one in the weights


def test_auto_text_encoder_takes_minilm_when_installed_and_records_it(pairs, tmp_path):
    pytest.importorskip(te.MINILM_PACKAGE)
    pytest.importorskip("transformers")
    out = tmp_path / "minilm"
    res = pretrain(pairs / "pairs.csv", out, config=tiny_config(text_encoder="auto"), progress=False, losses=["global"], **{**TINY, "steps": 1, "val_every": 1})
    assert res["text_encoder"] == "minilm" and json.loads((out / "run.json").read_text())["text_encoder"] == "minilm"
    assert ckpt.read_record(out / "checkpoints" / "best.safetensors")["spec"]["text_encoder"] == "minilm"
    model, enc_tok, dec_tok, _ = load_pretrained(out)
    assert isinstance(model.text, te.MiniLMTextEncoder) and enc_tok is not dec_tok


# distinct non-zero weights, so a term combined with another term's weight changes the total wrongly
TERM_WEIGHTS = {"global_alignment": 0.7, "token_alignment": 1.3, "summary": 0.4, "caption": 1.9, "distill": 0.6}
WEIGHT_OF = {"global": "global_alignment", "token": "token_alignment", "summary": "summary", "caption": "caption", "distill": "distill"}


@pytest.fixture(scope="module")
def joint_first_step(pairs, tmp_path_factory):
    """``weights -> the metrics row of stage 2's one step`` (HybridMED: every term), each run once.
    Stage 1 does not see the weights, so every run starts stage 2 from the same model and teacher;
    step 1's logged values come before its update, so the learning rate plays no part (TrainConfig
    refuses lr 0); fp32 keeps them off the CPU's bf16 units."""
    rows: dict = {}

    def run(weights: dict[str, float]) -> dict:
        key = tuple(sorted(weights.items()))
        if key not in rows:
            out = tmp_path_factory.mktemp("total")
            cfg = tiny_config(weights=weights, val_fraction=0.0)
            over = {**TINY, "summarize_steps": 1, "steps": 1, "val_every": 1, "precision": "fp32", "seed": 3}
            pretrain(pairs / "pairs.csv", out, text_only=pairs / "reports.csv", config=cfg, progress=False, **over)
            [row] = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
            rows[key] = row
        return rows[key]

    return run


@pytest.mark.parametrize("term", ["global", "token", "summary", "caption", "distill"])
def test_the_joint_loss_is_the_weighted_sum_of_the_logged_terms(joint_first_step, term):
    base = joint_first_step(TERM_WEIGHTS)
    terms = {k: base[f"loss/{k}"] for k in WEIGHT_OF}
    assert all(v > 0 for v in terms.values()), terms
    # every term enters with its own weight, and nothing else does
    assert base["loss"] == pytest.approx(sum(TERM_WEIGHTS[WEIGHT_OF[k]] * v for k, v in terms.items()), rel=1e-5)
    name = WEIGHT_OF[term]
    changed = joint_first_step({**TERM_WEIGHTS, name: TERM_WEIGHTS[name] + 2.0})
    assert {k: changed[f"loss/{k}"] for k in terms} == pytest.approx(terms, rel=1e-6)  # the same step, the same terms
    # the weight scales the logged (unweighted) term, and only it
    assert changed["loss"] - base["loss"] == pytest.approx(2.0 * terms[term], rel=1e-4, abs=1e-5)


def test_a_run_killed_between_its_two_stages_resumes_into_stage_two(hybrid_run, pairs, tmp_path):
    """Stage 1 finished, stage 2 had no checkpoint yet: --resume trains stage 2 from its start
    (as the pipeline's resume does) and ends with the uninterrupted run's weights."""
    import shutil

    out, _, _ = hybrid_run
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    shutil.rmtree(cut / "checkpoints")
    (cut / "metrics.jsonl").unlink()
    (cut / "run.json").write_text(json.dumps({"method": "pretrain", "status": "training"}), encoding="utf-8")
    result = pretrain(pairs / "pairs.csv", cut, text_only=pairs / "reports.csv", config=tiny_config(), resume=True, progress=False, seed=0, **TINY)
    assert result["status"] == "done" and result["steps"] == 8
    a, _ = ckpt.load_checkpoint(out / "checkpoints" / "last.safetensors")
    b, _ = ckpt.load_checkpoint(cut / "checkpoints" / "last.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
