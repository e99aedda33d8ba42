"""On a CUDA machine only (skipped elsewhere, so CI never depends on a GPU): the engine trains on the
GPU, its checkpoints load on a CPU, and both devices predict the same labels.

Run on a GPU with ``pytest tests/engine/test_cuda.py``; the rest of the suite also trains on the GPU
there, since ``device: auto`` picks it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medalloy.data.dataset import RawDataset
from medalloy.data.io import read_label
from medalloy.data.synth import generate_dataset
from medalloy.predict import predict_folder
from medalloy.recipes.expert import load_expert, train_expert

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def cxr(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return generate_dataset("Dataset902_SynthCXR", root, seed=1, cases_per_source=5, test_cases_per_source=2, progress=False)


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_expert_trains_on_cuda(cxr, tmp_path, precision):
    res = train_expert(cxr, tmp_path / "r", steps=40, batch_size=6, val_every=20, seed=0, device="cuda", precision=precision, progress=False)
    assert res["status"] == "done" and res["steps"] == 40
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert losses and all(np.isfinite(losses))
    # Learning, not just running: the lung is far above an empty or inverted prediction (~0).
    assert res["best"]["metrics"]["val/SynthCXR/dice_lung"] > 0.6


def test_cuda_checkpoint_predicts_the_same_on_cpu(cxr, tmp_path):
    run = tmp_path / "r"
    train_expert(cxr, run, steps=40, batch_size=6, val_every=20, seed=0, device="cuda", progress=False)
    model, _, _ = load_expert(run / "checkpoints" / "best.safetensors")  # CPU map by default
    assert all(p.device.type == "cpu" for p in model.parameters())
    on_gpu = predict_folder(run, cxr / "imagesTs", tmp_path / "gpu", device="cuda", precision="fp32", progress=False)
    on_cpu = predict_folder(run, cxr / "imagesTs", tmp_path / "cpu", device="cpu", precision="fp32", progress=False)
    assert len(on_gpu) == len(RawDataset(cxr).test_cases()) == len(on_cpu)
    for a, b in zip(sorted(on_gpu), sorted(on_cpu)):
        la, lb = read_label(a)[0], read_label(b)[0]
        # fp32 on both; only summation order differs, so at most a few boundary pixels may flip.
        assert np.mean(la == lb) > 0.999, a.name
        assert la.max() > 0, a.name
