"""Does medalloy answer as nnU-Net does with a model nnU-Net trained? A real nnU-Net v2 folder,
imported by medalloy (the path ``medalloy train amalgamate --experts`` and ``medalloy predict`` take),
against ``nnUNetv2_predict`` on the same held-out cases.

    python -m benchmarks.nnunet_agreement [--data ../shared/data] [--dataset JSRT] [--budget-minutes 3]
                                          [--venv runs/nnunet-venv]

1. nnU-Net trains its 2d configuration on the experts benchmark's train/val split of the dataset in
   its own environment (``benchmarks/nnunet/setup_venv.sh``) with its own commands, and predicts the
   test cases with its defaults (mirroring) (benchmarks/nnunet_peer.py: the experts benchmark's peer);
2. medalloy loads the trained ``fold_0`` folder (``plans.json``, ``dataset.json``,
   ``checkpoint_final.pth``, read with ``weights_only=True``) and predicts the same images with
   mirroring in fp32 (as nnU-Net on a CPU), through its own preprocessing (from nnU-Net's plans) and sliding window;
3. both are scored against each other (Dice of medalloy's labels with nnU-Net's as the reference)
   and against the ground truth.

The issue's target: Dice between the two >= 0.99 for every label. The training budget only needs a
model that segments something: the check is agreement, not accuracy. Writes
``benchmarks/results/nnunet_agreement/results.json`` and ``results.md`` (``--report`` renders the
markdown again from the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import copy_ground_truth, dataset_path, evaluate, splits
from benchmarks.nnunet_peer import CONFIGURATION, DATASET_IDS, DEFAULT_VENV, FOLD, PLANS, TRAINER, dataset_folder_name, run_nnunet

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "nnunet_agreement"
DEFAULT_DATA = Path(os.environ.get("MEDALLOY_SHARED_DATA", HERE.parent.parent / "shared" / "data"))
TARGET = 0.99
HARDLY = 0.1  # below this Dice against the truth a label is hardly predicted: its agreement says little


def log(msg: str) -> None:
    print(f"[nnunet-agreement] {msg}", flush=True)


def agreement(name: str, data: Path, work: Path, budget: float, venv: Path, seed: int, threads: int | None) -> dict[str, Any]:
    from medalloy.data.dataset import RawDataset
    from medalloy.predict import predict_cases

    ds_path = dataset_path(name, data, work)
    split = splits(name, ds_path, seed)
    peer = run_nnunet(name, ds_path, split, budget, work, venv, threads=threads, overwrite=True)
    root = work / "nnunet"
    dataset_id = DATASET_IDS.get(name, 599)
    fold = root / "nnUNet_results" / dataset_folder_name(dataset_id, name) / f"{TRAINER}__{PLANS}__{CONFIGURATION}" / f"fold_{FOLD}"
    nnunet_pred = root / "pred" / name
    mine = work / "medalloy-pred" / name
    log(f"{name}: medalloy predicts {len(split['test'])} test cases with {fold}")
    predict_cases(fold, ds_path, list(split["test"]), mine, tta=True, checkpoint="last", precision="fp32", overwrite=True, progress=sys.stderr.isatty())
    labels = RawDataset(ds_path).spec.labels
    fg = [k for k, v in labels.items() if v != 0]
    between = evaluate(mine, nnunet_pred, labels, work / "eval-agreement" / name)
    gt = work / "gt-agreement" / name
    copy_ground_truth(ds_path, list(split["test"]), gt, labels)
    truth = evaluate(mine, gt, labels, work / "eval-medalloy" / name)
    return {
        "dataset": name,
        "nnunet_folder": str(fold.relative_to(HERE.parent)) if fold.is_relative_to(HERE.parent) else str(fold),
        "pixel_agreement": pixel_agreement(mine, nnunet_pred),
        "test_cases": len(split["test"]),
        "agreement_dice": {k: between[k]["dice"] for k in fg},
        "medalloy_dice": {k: truth[k]["dice"] for k in fg},
        "nnunet_dice": {k: peer[k]["dice"] for k in fg},
        "nnunet_iterations": peer["iterations"],
        "nnunet_train_minutes": peer["train_minutes"],
        "nnunetv2": peer["nnunetv2"],
        "tta": True,
    }


def pixel_agreement(a: Path, b: Path) -> float:
    """The share of pixels (voxels) of all cases that carry the same label in both folders."""
    import numpy as np

    from medalloy.data.io import read_label

    same = total = 0
    for f in sorted(a.iterdir()):
        x, y = read_label(f)[0], read_label(b / f.name)[0]
        same, total = same + int(np.sum(x == y)), total + x.size
    return round(same / max(total, 1), 6)


def markdown(res: dict[str, Any]) -> str:
    out = [
        "# nnU-Net v2 models imported by medalloy: agreement with nnUNetv2_predict",
        "",
        f"Made by `python -m benchmarks.nnunet_agreement --dataset {res['dataset']} --budget-minutes {res['budget_minutes']:g}`: "
        f"nnU-Net {res['nnunetv2']} trained its {CONFIGURATION} configuration ({res['nnunet_iterations']} iterations, "
        f"{res['nnunet_train_minutes']} min on 2 CPU cores) and predicted the {res['test_cases']} held-out cases with its defaults "
        "(mirroring); medalloy imported the same `fold_0` folder and predicted the same images with mirroring. "
        f"Agreement: Dice of medalloy's labels against nnU-Net's (mean over cases); {100 * res['pixel_agreement']:.3f} % of all "
        "pixels carry the same label in both.",
        "",
        "| label | agreement Dice | medalloy vs truth | nnU-Net vs truth | target |",
        "|---|---|---|---|---|",
    ]
    for k, v in res["agreement_dice"].items():
        verdict = f"{'met' if v >= TARGET else 'missed'} (>= {TARGET})"
        if res["nnunet_dice"][k] < HARDLY:
            verdict = "not measured: the model hardly predicts this label, so the two agree or not on a few scattered pixels"
        out.append(f"| {k} | {v:.4f} | {res['medalloy_dice'][k]:.3f} | {res['nnunet_dice'][k]:.3f} | {verdict} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--work", type=Path, default=HERE.parent / "runs" / "bench-nnunet-agreement")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--dataset", default="JSRT", choices=sorted(DATASET_IDS))
    p.add_argument("--budget-minutes", type=float, default=3.0, help="nnU-Net's training (agreement needs a model, not a good one)")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--report", action="store_true", help="re-render results.md from results.json")
    a = p.parse_args(argv)
    if a.report:
        from medalloy.jsonio import write_text_atomic

        write_text_atomic(a.results / "results.md", markdown(json.loads((a.results / "results.json").read_text(encoding="utf-8"))))
        return 0
    if not a.data.is_dir():
        print(f"nnunet_agreement.py: no data at {a.data}; pass --data", file=sys.stderr)
        return 1
    res = agreement(a.dataset, a.data, a.work, a.budget_minutes, a.venv, a.seed, a.threads)
    res["budget_minutes"] = a.budget_minutes
    from medalloy.jsonio import write_text_atomic

    a.results.mkdir(parents=True, exist_ok=True)
    write_text_atomic(a.results / "results.json", json.dumps(res, indent=2) + "\n")
    write_text_atomic(a.results / "results.md", markdown(res))
    print(markdown(res))
    measured = [v for k, v in res["agreement_dice"].items() if res["nnunet_dice"][k] >= HARDLY]
    return 0 if measured and all(v >= TARGET for v in measured) else 2


if __name__ == "__main__":
    raise SystemExit(main())
