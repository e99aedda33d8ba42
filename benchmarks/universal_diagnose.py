"""Why ACDC fails in the universal model: ACDC alone through the universal recipe (no priors, so
only the per-task sigmoid loss and head differ from the expert), a fixed number of steps, then per
class the mean sigmoid inside and outside the class on validation cases.

    python benchmarks/universal_diagnose.py [--steps 400] [--lr 2e-3 3e-3]

Writes ``benchmarks/results/universal_diagnose.json`` (benchmarks/results/universal.md's notes quote it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from common import PLAN_OPTIONS, dataset_path, splits

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = Path(os.environ.get("MEDALLOY_SHARED_DATA", HERE.parent.parent / "shared" / "data"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--work", type=Path, default=HERE.parent / "runs" / "bench-universal")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, nargs="*", default=[2e-3, 3e-3])
    p.add_argument("--results", type=Path, default=HERE / "results")
    a = p.parse_args(argv)
    if not a.data.is_dir():
        print(f"universal_diagnose.py: data folder {a.data} not found; pass --data", file=sys.stderr)
        return 1
    from medalloy.data.dataset import RawDataset
    from medalloy.engine.inference import Predictor
    from medalloy.recipes.universal import PlanOptions, UniversalConfig, load_for_dataset, train_universal

    name = "ACDC"
    folder = dataset_path(name, a.data, a.work)
    ids = splits(name, folder, 0)
    ds = RawDataset(folder)
    rows = []
    for lr in a.lr:
        cfg = UniversalConfig(plan_options={name: PlanOptions(**PLAN_OPTIONS[name])}, priors="none")
        cfg.train.steps, cfg.train.val_every, cfg.train.lr = a.steps, a.steps, lr
        run = a.work / "runs" / "diagnose" / f"acdc-alone-lr{lr:g}"
        res = train_universal([folder], run, config=cfg, overwrite=True, progress=sys.stderr.isatty(), splits={name: {"train": ids["train"], "val": ids["val"]}})
        model, plan, _ = load_for_dataset(run / "checkpoints" / "last.safetensors", name)
        predictor = Predictor(model, plan, activation="sigmoid")
        inside: dict[str, list[float]] = {}
        outside: dict[str, list[float]] = {}
        for cid in ids["val"]:
            image, label, meta = ds.load(ds.case(cid))
            probs = predictor.predict_probabilities(image, meta).numpy()
            label = label.reshape(probs.shape[1:])
            for k, (cls, value) in enumerate(sorted(((c, v) for c, v in ds.spec.labels.items() if v), key=lambda cv: cv[1])):
                inside.setdefault(cls, []).append(float(probs[k][label == value].mean()))
                outside.setdefault(cls, []).append(float(probs[k][label != value].mean()))
        row = {
            "lr": lr, "steps": res["steps"], "val_dice": {k.split("dice_")[1]: round(v, 3) for k, v in res["best"]["metrics"].items() if "dice_" in k},
            "mean_sigmoid_inside": {k: round(float(np.mean(v)), 3) for k, v in inside.items()},
            "mean_sigmoid_outside": {k: round(float(np.mean(v)), 3) for k, v in outside.items()},
        }  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    a.results.mkdir(parents=True, exist_ok=True)
    (a.results / "universal_diagnose.json").write_text(json.dumps({"dataset": name, "priors": "none", "rows": rows}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
