"""The run folder a recipe opens: refused, resumed or replaced; a killed run's half-written files swept."""

from __future__ import annotations

import json

import pytest

from medalloy.engine.trainer import TrainConfig
from medalloy.errors import MedalloyError
from medalloy.recipes.scaffold import open_run


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
