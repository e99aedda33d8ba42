"""Both recipes through the CLI under ``torchrun --nproc_per_node=2`` (gloo, one thread a rank):
rank 0 alone prepares and writes the run folder, a refused ``--out`` is one line, and a universal
run (one dataset a step, drawn per rank) SIGKILL-ed on every rank and resumed ends bit-identical
to one never interrupted."""

from __future__ import annotations

import json

import pytest
from subprocs import KILL_AT_STEP, assert_bit_identical, checkpoint_tensors, rows_without_time, run, torchrun

from medalloy.data.synth import generate_dataset
from medalloy.engine import checkpoint as ckpt

pytestmark = pytest.mark.slow

CFG = "train: {val_every: 4, checkpoint_every: 4, log_every: 2, device: cpu}\nmax_val_cases: 1\nfolds: 2\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    names = ["Dataset902_SynthCXR", "Dataset904_SynthEndo"]
    return [generate_dataset(n, root, seed=4, cases_per_source=2, test_cases_per_source=1, progress=False) for n in names]


def _cli(*args: str) -> list[str]:
    return torchrun("-m", "medalloy", "--threads", "1", "-q", *args)


def test_expert_under_torchrun_writes_one_run_and_refuses_an_existing_one(data, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CFG + "batch_size: 2\n", encoding="utf-8")
    out = tmp_path / "expert"
    proc = run(_cli("train", "expert", str(data[0]), "--out", str(out), "--steps", "4", "--config", str(cfg)), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("4 steps in") == 1  # rank 0 reports, once
    res = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert res["status"] == "done" and res["steps"] == 4
    record = ckpt.read_record(out / "checkpoints" / "last.safetensors")
    assert record["step"] == 4 and record["method"] == "expert"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["checkpoints", "config.yaml", "metrics.jsonl", "plan.json", "run.json", "split.json", "training_curve.png"]
    )
    assert [r["step"] for r in rows_without_time(out / "metrics.jsonl") if r["kind"] == "train"] == [2, 4]
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    again = run(_cli("train", "expert", str(data[0]), "--out", str(out), "--steps", "4", "--device", "cpu"), tmp_path)
    assert again.returncode != 0
    errors = [line for line in again.stderr.splitlines() if line.startswith("medalloy: error")]
    assert len(errors) == 1 and "--overwrite" in errors[0] and str(out) in errors[0]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_universal_under_torchrun_killed_and_resumed_is_bit_identical(data, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    # each dataset its own field of view (48 and 32 px), one dataset a step: the two ranks often
    # train on different datasets, of different shapes, in one step
    plan = "plan_options: {SynthCXR: {max_2d_side: 48}, SynthEndo: {max_2d_side: 32}}\n"
    cfg.write_text(CFG + plan + "batch_size: 2\nbase_filters: 4\ndatasets_per_step: 1\n", encoding="utf-8")
    common = ["train", "universal", *map(str, data), "--steps", "8", "--config", str(cfg)]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    proc = run(_cli(*common, "--out", str(whole)), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed = run(torchrun(str(KILL_AT_STEP), "6", "--threads", "1", "-q", *common, "--out", str(broken)), tmp_path)
    assert killed.returncode != 0
    assert ckpt.read_record(broken / "checkpoints" / "last.safetensors")["step"] == 4
    resumed = run(_cli(*common, "--out", str(broken), "--resume"), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for which in ("last", "best"):
        assert_bit_identical(
            checkpoint_tensors(whole / "checkpoints" / f"{which}.safetensors"), checkpoint_tensors(broken / "checkpoints" / f"{which}.safetensors")
        )
    assert rows_without_time(whole / "metrics.jsonl") == rows_without_time(broken / "metrics.jsonl")
    # the per-dataset losses are reduced over the ranks: a logged step with both means the ranks
    # trained on different datasets (different shapes) in that step
    train_rows = [r for r in rows_without_time(whole / "metrics.jsonl") if r["kind"] == "train"]
    assert any(r["loss/SynthCXR"] is not None and r["loss/SynthEndo"] is not None for r in train_rows), train_rows
    metrics = json.loads((broken / "run.json").read_text(encoding="utf-8"))["best"]["metrics"]
    assert {"val/SynthCXR/dice_lung", "val/SynthCXR/dice_heart", "val/SynthEndo/dice_lesion"} <= set(metrics)
