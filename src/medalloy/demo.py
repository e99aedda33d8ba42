"""``medalloy demo``: the demo pipeline (``medalloy/pipeline/demo.yaml``, linked from
``examples/demo.yaml``) on the built-in synthetic collection, in minutes on a CPU.

Pretraining on synthetic radiographs with reports -> one expert per dataset (and the chest X-ray
expert again from the pretrained encoder) -> one universal (Hermes) model -> the 2D experts
amalgamated (KA2ER) -> a tiny student of the chest X-ray expert (relation KD) -> ONNX -> every
model on the held-out cases -> ``OUT/report.md``. Its settings live in the YAML.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from medalloy.errors import MedalloyError
from medalloy.pipeline import run
from medalloy.pipeline.runner import STATE_FILE

DEMO_FILE = "demo.yaml"


QUICK_LATENCY_RUNS = 3


def demo_config(steps: int | None = None, seed: int = 0) -> dict[str, Any]:
    """The demo pipeline as a dict; ``steps`` (for a quick look or a test) replaces every training
    stage's step count, pretraining's summarization steps too, and times each model 3 times."""
    cfg = yaml.safe_load(resources.files("medalloy.pipeline").joinpath(DEMO_FILE).read_text(encoding="utf-8"))
    cfg["seed"] = seed
    if steps is not None:
        for name, stage in cfg["stages"].items():
            if "train" in stage:
                stage["train"] = {**stage["train"], "steps": steps, "val_every": max(1, steps // 2)}
            if "summarize_steps" in stage:
                stage["summarize_steps"] = steps
            if stage.get("kind", name) == "evaluate":
                stage["latency_runs"] = QUICK_LATENCY_RUNS  # a quick look times nothing worth 20 runs
    return cfg


def run_demo(out: str | Path = "runs/demo", overwrite: bool = False, steps: int | None = None, seed: int = 0, progress: bool = True) -> Path:
    """Run the demo pipeline into ``out`` (a rerun reuses what finished; ``overwrite`` starts
    afresh); returns the path of ``report.md``."""
    out = Path(out)
    if overwrite and out.exists():
        if not (out / STATE_FILE).is_file():
            raise MedalloyError(f"refusing to delete a folder that has no {STATE_FILE}", out, "choose an empty or new --out folder")
        shutil.rmtree(out)
    return run(demo_config(steps, seed), out, progress=progress).out / "report.md"
