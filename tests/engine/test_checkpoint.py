"""Checkpoint IO: exact round trips, the record without tensors, the sidecar, and every refusal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medalloy.engine import checkpoint as ckpt
from medalloy.errors import MedalloyError


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    return {
        "model/net/w": base,
        "model/net/b": torch.arange(5, dtype=torch.int64),
        "ema/net/w": base.t(),  # non-contiguous view of a shared storage
        "optim/0/step": torch.tensor(3.0),
        "model/net/h": torch.randn(2, 3, generator=g).to(torch.bfloat16),
    }


RECORD = {"method": "expert", "tasks": [{"dataset": "Toy", "labels": {"background": 0, "a": 1}}], "step": 7, "best": {"value": 0.5}}


def _one_line(exc: pytest.ExceptionInfo, path: Path) -> None:
    assert "\n" not in str(exc.value) and str(path) in str(exc.value)


def _no_temp(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")]


def test_round_trip_tensors_and_record(tmp_path):
    tensors = _tensors()
    path = ckpt.save_checkpoint(tmp_path / "sub" / "last.safetensors", tensors, RECORD)
    assert path == tmp_path / "sub" / "last.safetensors"
    loaded, record = ckpt.load_checkpoint(path, method="expert")
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    for k, v in RECORD.items():
        assert record[k] == v
    assert record["format"] == ckpt.FORMAT and record["format_version"] == ckpt.FORMAT_VERSION
    assert set(record["versions"]) == {"medalloy", "torch", "monai", "python"}
    # the caller's tensors are untouched (saving clones)
    assert not tensors["ema/net/w"].is_contiguous()
    _no_temp(path.parent)


def test_record_without_tensors_equals_sidecar(tmp_path):
    path = ckpt.save_checkpoint(tmp_path / "best.safetensors", _tensors(), RECORD)
    record = ckpt.read_record(path)
    sidecar = json.loads((tmp_path / "best.json").read_text(encoding="utf-8"))
    assert sidecar == record
    assert record["step"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json", "best.safetensors"]


def test_group_and_prefixed_are_inverse():
    state = {"a.weight": torch.ones(2), "b.bias": torch.zeros(1)}
    flat = {**ckpt.prefixed(state, "model/net"), "model/net2/x": torch.ones(1), "ema/net/a.weight": torch.ones(2)}
    back = ckpt.group(flat, "model/net")
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    assert ckpt.group(flat, "model/net/") == back


def test_overwrite_is_atomic_and_clean(tmp_path):
    p = tmp_path / "last.safetensors"
    ckpt.save_checkpoint(p, {"x": torch.zeros(3)}, {**RECORD, "step": 1})
    ckpt.save_checkpoint(p, {"x": torch.ones(3)}, {**RECORD, "step": 2})
    t, r = ckpt.load_checkpoint(p)
    assert torch.equal(t["x"], torch.ones(3)) and r["step"] == 2
    _no_temp(tmp_path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(MedalloyError, match="not found") as exc:
        ckpt.load_checkpoint(tmp_path / "none.safetensors")
    _one_line(exc, tmp_path / "none.safetensors")


def test_random_bytes(tmp_path):
    p = tmp_path / "rand.safetensors"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    with pytest.raises(MedalloyError, match="not a readable safetensors") as exc:
        ckpt.load_checkpoint(p)
    _one_line(exc, p)


@pytest.mark.parametrize("keep", [0.5, 0.99, 8 / 2000])
def test_truncated_file(tmp_path, keep):
    p = ckpt.save_checkpoint(tmp_path / "full.safetensors", {"w": torch.randn(20, 20)}, RECORD)
    raw = p.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[: max(1, int(len(raw) * keep))])
    with pytest.raises(MedalloyError) as exc:
        ckpt.load_checkpoint(cut)
    _one_line(exc, cut)


def test_foreign_safetensors_without_record(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(p), metadata={"format": "pt"})
    with pytest.raises(MedalloyError, match="no medalloy record") as exc:
        ckpt.read_record(p)
    _one_line(exc, p)
    save_file({"w": torch.zeros(2)}, str(p))
    with pytest.raises(MedalloyError, match="no medalloy record"):
        ckpt.load_checkpoint(p)


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"format": "other"}), "not a medalloy checkpoint"),
        (json.dumps(["a", "list"]), "not a medalloy checkpoint"),
    ],
)
def test_bad_embedded_record(tmp_path, text, match):
    from safetensors.torch import save_file

    p = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(2)}, str(p), metadata={ckpt.META_KEY: text})
    with pytest.raises(MedalloyError, match=match) as exc:
        ckpt.read_record(p)
    _one_line(exc, p)


def test_wrong_method(tmp_path):
    p = ckpt.save_checkpoint(tmp_path / "c.safetensors", {"w": torch.zeros(1)}, {**RECORD, "method": "kd"})
    with pytest.raises(MedalloyError, match="'kd', not 'expert'") as exc:
        ckpt.load_checkpoint(p, method="expert")
    _one_line(exc, p)
    assert ckpt.load_checkpoint(p, method="kd")[1]["method"] == "kd"


def test_newer_format_version(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "future.safetensors"
    rec = {"format": ckpt.FORMAT, "format_version": ckpt.FORMAT_VERSION + 1, "method": "expert"}
    save_file({"w": torch.zeros(1)}, str(p), metadata={ckpt.META_KEY: json.dumps(rec)})
    with pytest.raises(MedalloyError, match="newer than this medalloy reads") as exc:
        ckpt.load_checkpoint(p)
    _one_line(exc, p)
    assert "upgrade medalloy" in str(exc.value)
