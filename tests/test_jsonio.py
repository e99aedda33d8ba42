"""Atomic writes: a write interrupted at any point leaves the old file whole, and no temporary file."""

from __future__ import annotations

import os

import pytest

from medalloy.engine.logging import MetricsLog, read_metrics
from medalloy.errors import MedalloyError
from medalloy.jsonio import read_json, write_json_atomic, write_text_atomic


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
        real_fdopen = os.fdopen

        def torn_fdopen(fd, *args, **kwargs):
            fh = real_fdopen(fd, *args, **kwargs)
            write = fh.write
            fh.write = lambda text: (write(text[:3]), fh.flush(), boom())
            return fh

        monkeypatch.setattr(os, "fdopen", torn_fdopen)
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
