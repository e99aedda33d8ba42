"""Atomic writes: a write interrupted at any point leaves the old file whole, and no temporary file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from medalloy.engine.logging import MetricsLog, read_metrics
from medalloy.errors import MedalloyError
from medalloy.jsonio import atomic_folder, atomic_path, read_json, write_json_atomic, write_text_atomic


@pytest.mark.parametrize("where", ["write", "rename"])
def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch, where):
    target = tmp_path / "config.yaml"
    write_text_atomic(target, "steps: 10\n")

    class Killed(BaseException):
        pass

    def boom(*_a, **_k):
        raise Killed()

    if where == "rename":
        monkeypatch.setattr(os, "replace", boom)
    else:  # killed after a few characters reached the disk
        real_write_text = Path.write_text

        def torn_write_text(self, text, *args, **kwargs):
            real_write_text(self, text[:3], *args, **kwargs)
            boom()

        monkeypatch.setattr(Path, "write_text", torn_write_text)
    with pytest.raises(Killed):
        write_text_atomic(target, "steps: 20\n")
    assert target.read_text(encoding="utf-8") == "steps: 10\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_json_round_trip_and_permissions(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"x": [1, 2]})
    assert read_json(tmp_path / "a.json", "thing", "fix") == {"x": [1, 2]}
    assert oct((tmp_path / "a.json").stat().st_mode & 0o777) == "0o644"


def test_metrics_resume_drops_a_torn_last_line_and_rows_past_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1}\n{"kind": "train", "step": 2}\n{"kind": "train", "step": 3}\n{"kind": "tra', encoding="utf-8")
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    MetricsLog(path, resume_step=2)
    assert path.read_text(encoding="utf-8") == '{"kind": "train", "step": 1}\n{"kind": "train", "step": 2}\n'
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n', encoding="utf-8")
    with pytest.raises(MedalloyError, match="line 2 is not JSON") as exc:
        MetricsLog(path, resume_step=2)
    assert "metrics.jsonl" in str(exc.value)


def _mode(path: Path) -> str:
    return oct(path.stat().st_mode & 0o777)


def test_atomic_path_replaces_the_target_only_when_the_block_ends(tmp_path):
    target = tmp_path / "new" / "deeper" / "scan.nii.gz"  # parent folders do not exist yet
    with atomic_path(target, suffix=".nii.gz") as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".tmp-") and tmp.name.endswith(".nii.gz")
        tmp.write_bytes(b"first")
        assert not target.exists()  # nothing at the target while the writer works
    assert target.read_bytes() == b"first"
    assert _mode(target) == "0o644"  # not mkstemp's 0600
    with atomic_path(target) as tmp:  # default suffix: the target's last one
        assert tmp.suffix == ".gz"
        tmp.write_bytes(b"second")
        assert target.read_bytes() == b"first"
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["scan.nii.gz"]


def test_atomic_path_keeps_the_old_target_and_leaves_no_temporary_on_an_exception(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    os.chmod(target, 0o600)

    class Killed(BaseException):
        pass

    with pytest.raises(Killed):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise Killed()
    assert target.read_bytes() == b"old" and _mode(target) == "0o600"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_atomic_path_suits_numpy_savez_which_appends_npz_to_other_names(tmp_path):
    with atomic_path(tmp_path / "case1.npz") as tmp:
        np.savez_compressed(tmp, probabilities=np.arange(3, dtype=np.float16))
    assert [p.name for p in tmp_path.iterdir()] == ["case1.npz"]
    assert np.load(tmp_path / "case1.npz")["probabilities"].tolist() == [0.0, 1.0, 2.0]


def test_atomic_folder_swaps_in_a_complete_folder_or_leaves_the_old_one(tmp_path):
    target = tmp_path / "out" / "Dataset"
    with atomic_folder(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".tmp-Dataset-")
        (tmp / "a.txt").write_text("1", encoding="utf-8")
        assert not target.exists()
    assert [p.name for p in target.iterdir()] == ["a.txt"] and _mode(target) == "0o755"
    with pytest.raises(ValueError):
        with atomic_folder(target) as tmp:
            (tmp / "b.txt").write_text("2", encoding="utf-8")
            raise ValueError("half-built")
    assert [p.name for p in target.iterdir()] == ["a.txt"]
    with atomic_folder(target) as tmp:  # a non-empty folder is replaced whole: nothing of it stays
        (tmp / "b.txt").write_text("2", encoding="utf-8")
    assert [p.name for p in target.iterdir()] == ["b.txt"]
    assert [p.name for p in target.parent.iterdir()] == ["Dataset"]  # no .tmp- or .old- leftovers


def test_atomic_folder_puts_the_old_folder_back_when_the_swap_fails(tmp_path, monkeypatch):
    target = tmp_path / "Dataset"
    target.mkdir()
    (target / "a.txt").write_text("1", encoding="utf-8")
    real_replace = os.replace

    def failing_swap(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_swap)
    with pytest.raises(OSError, match="disk full"):
        with atomic_folder(target) as tmp:
            (tmp / "b.txt").write_text("2", encoding="utf-8")
    assert [p.name for p in target.iterdir()] == ["a.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["Dataset"]
