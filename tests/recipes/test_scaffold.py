"""The run folder a recipe opens: refused, resumed or replaced; a killed run's half-written files swept."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from medalloy.engine.trainer import TrainConfig, TrainSpec
from medalloy.errors import MedalloyError
from medalloy.recipes.config import SegmentationConfig
from medalloy.recipes.scaffold import Recipe, kept_split, open_run, run_recipe, split_record


def test_resume_sweeps_half_written_files_and_folders_only(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / ".tmp-abc.safetensors").parent.mkdir(parents=True)
    (out / "run.json").write_text('{"status": "training"}')
    (out / "checkpoints" / ".tmp-abc.safetensors").write_text("torn")
    (out / "checkpoints" / "last.safetensors").write_text("whole")
    (out / ".tmp-folder-x" / ".tmp-inner").mkdir(parents=True)  # a folder written atomically, with a temporary of its own inside
    (out / ".tmp-folder-x" / ".tmp-inner" / "f.png").write_text("half")
    run = open_run(out, TrainConfig(device="cpu"), resume=True, progress=False)
    assert run.resume and run.out == out
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["checkpoints", "checkpoints/last.safetensors", "run.json"]


def test_a_folder_of_other_files_is_never_replaced(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(MedalloyError, match="output folder exists and is not empty"):
        open_run(tmp_path, TrainConfig(device="cpu"), progress=False)
    with pytest.raises(MedalloyError, match="refusing to delete a folder that has no run.json"):
        open_run(tmp_path, TrainConfig(device="cpu"), overwrite=True, progress=False)
    assert (tmp_path / "mine.txt").read_text() == "user data"
    fresh = open_run(tmp_path / "new", TrainConfig(device="cpu"), progress=False)
    assert json.loads((fresh.out / "run.json").read_text()) == {"status": "preparing"}


class _Toy(Recipe):
    """A recipe of one weight fitted to 3.0: enough to watch the driver call every hook."""

    METHOD = "toy"

    def __init__(self, cfg, calls):
        super().__init__(cfg, progress=False)
        self.calls = calls

    def check(self):
        self.calls.append("check")

    def inputs(self):
        return {"dataset": "toyset"}

    def prepare(self, run):
        self.calls.append(("prepare", (run.out / "run.json").exists(), (run.out / "config.yaml").exists()))

    def choose_split(self, run):
        self.calls.append(("split", (run.out / "config.yaml").exists()))
        return split_record(0, {"toyset": {"train": ["a", "b"], "val": ["c"]}})

    def train_spec(self, run, split):
        status = json.loads((run.out / "run.json").read_text())
        self.calls.append(("spec", split["datasets"]["toyset"]["val"], status["status"], status["dataset"]))
        net = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.zeros_(net.weight)

        def step_fn(models, batch):
            return {"loss": ((models["net"](batch) - 3.0) ** 2).mean()}

        return TrainSpec(
            models={"net": net},
            trainable=["net"],
            step_fn=step_fn,
            batches=lambda step, dist: torch.ones(4, 1),
            record={"method": "toy", "spec": {"method": "toy", "version": 1, "width": 1}},
        )

    def result(self, summary):
        self.calls.append(("result", summary["steps"]))
        return {"name": "toy-run"}


def test_run_recipe_calls_the_hooks_in_order_and_writes_one_layout(tmp_path):
    cfg = SegmentationConfig(train=TrainConfig(steps=3, lr=0.1, val_every=3, device="cpu", progress=False))
    calls = []
    result = run_recipe(_Toy(cfg, calls), tmp_path / "run", progress=False)
    assert calls == [
        "check",
        ("prepare", True, False),  # the folder is marked as medalloy's before anything is decided
        ("split", True),  # the resolved config is written first
        ("spec", ["c"], "training", "toyset"),  # run.json says what trains before training starts
        ("result", 3),
    ]
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved == result
    assert (saved["method"], saved["dataset"], saved["status"], saved["name"], saved["steps"]) == ("toy", "toyset", "done", "toy-run", 3)
    assert saved["spec"] == {"method": "toy", "version": 1, "width": 1} and set(saved["timings"]) == {"started", "finished", "wall_seconds"}
    assert json.loads((tmp_path / "run" / "split.json").read_text()) == {"fold": 0, "datasets": {"toyset": {"train": ["a", "b"], "val": ["c"]}}}
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["steps"] == 3
    assert (tmp_path / "run" / "checkpoints" / "last.safetensors").exists()
    with pytest.raises(MedalloyError, match="output folder exists and is not empty"):
        run_recipe(_Toy(cfg, []), tmp_path / "run", progress=False)  # refused before check's work is kept anywhere


def test_kept_split_reads_both_shapes_and_a_new_run_has_none(tmp_path):
    run = open_run(tmp_path / "r", TrainConfig(device="cpu"), progress=False)
    assert kept_split(run, ["A"]) is None  # a new run keeps nothing
    (run.out / "split.json").write_text(json.dumps({"fold": 1, "train": ["x"], "val": ["y"]}))  # the shape before one schema
    resumed = open_run(tmp_path / "r", TrainConfig(device="cpu"), resume=True, progress=False)
    assert kept_split(resumed, ["A"]) == {"A": {"train": ["x"], "val": ["y"]}}
    (run.out / "split.json").write_text(json.dumps(split_record(1, {"A": {"train": ["p"], "val": []}, "B": {"train": ["q"], "val": ["r"]}})))
    assert kept_split(resumed, ["B", "A"]) == {"B": {"train": ["q"], "val": ["r"]}, "A": {"train": ["p"], "val": []}}
