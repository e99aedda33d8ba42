"""Why ACDC fails in the universal model: ACDC alone through the universal recipe (no priors, so
only the per-task loss and head differ from the expert), a fixed number of steps, with the paper's
per-task BCE and with the exclusive class term (``class_loss``), task logits started at 0 or at a
prior probability (``prior_probability``), and the expert for the same steps as the control
(``--expert``); per class the mean probability inside and outside the class on
validation cases.

    python -m benchmarks.universal_diagnose [--steps 400] [--lr 2e-3] [--class-loss bce exclusive] [--prior-probability none 0.01] [--expert]
    python -m benchmarks.universal_diagnose --mix JSRT [Shenzhen Polyp] [--weighting uniform] [--priors none] [--steps 800]

``--mix`` trains ACDC in a mix with the named datasets instead (defaults otherwise; ``--steps`` for
the whole mix, so with uniform weighting and one neighbour ACDC gets about half): does a neighbour
interfere, and which? Rows go to ``diagnose_mix.json`` (appended, one per mix).

Writes ``benchmarks/results/universal/diagnose.json`` (the universal benchmark's NOTES.md beside it quotes both).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from benchmarks.common import PLAN_OPTIONS, dataset_path, member_folder, splits

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = Path(os.environ.get("MEDALLOY_SHARED_DATA", HERE.parent.parent / "shared" / "data"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--work", type=Path, default=HERE.parent / "runs" / "bench-universal")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, nargs="*", default=[2e-3])
    p.add_argument("--class-loss", nargs="*", default=["bce", "exclusive"], choices=["bce", "exclusive"])
    p.add_argument("--prior-probability", nargs="*", default=["none", "0.01"], help="task logit offsets' start (none: at 0, the paper's)")
    p.add_argument("--expert", action="store_true", help="also train the ACDC expert for the same steps (the control)")
    p.add_argument("--results", type=Path, default=HERE / "results" / "universal")
    p.add_argument("--mix", nargs="*", default=None, help="train ACDC in a mix with these datasets (JSRT, Shenzhen, Polyp, ...)")
    p.add_argument("--weighting", default="uniform", choices=["uniform", "sqrt", "size"])
    p.add_argument("--priors", default="none", choices=["task+modality", "task", "none"])
    p.add_argument("--seed", type=int, default=0, help="with --mix: the training seed (initialisation, sampling)")
    p.add_argument("--datasets-per-step", type=int, default=1, help="with --mix: datasets whose batches one optimizer step averages (each at its own patch)")
    p.add_argument("--patch", type=int, default=None, help="with --mix: one shared patch side and mixed-dataset batches (default: one dataset a step)")
    a = p.parse_args(argv)
    if not a.data.is_dir():
        print(f"universal_diagnose.py: data folder {a.data} not found; pass --data", file=sys.stderr)
        return 1
    from medalloy.data.dataset import RawDataset
    from medalloy.engine.inference import Predictor
    from medalloy.planning.multi_dataset import PlanOptions
    from medalloy.recipes.registry import load_checkpoint_model
    from medalloy.recipes.universal import UniversalConfig, train_universal

    name = "ACDC"
    if a.mix is not None:
        return mix(a, name)
    folder = dataset_path(name, a.data, a.work)
    ids = splits(name, folder, 0)
    ds = RawDataset(folder)
    rows = []
    classes = sorted(((c, v) for c, v in ds.spec.labels.items() if v), key=lambda cv: cv[1])

    def row(what: dict, res: dict, predictor: Predictor, first: int) -> dict:
        """Validation Dice, and the mean probability of each class inside and outside it (channel ``first + k``)."""
        inside: dict[str, list[float]] = {}
        outside: dict[str, list[float]] = {}
        for cid in ids["val"]:
            image, label, meta = ds.load(ds.case(cid))
            probs = predictor.predict_probabilities(image, meta).numpy()
            label = label.reshape(probs.shape[1:])
            for k, (cls, value) in enumerate(classes):
                inside.setdefault(cls, []).append(float(probs[first + k][label == value].mean()))
                outside.setdefault(cls, []).append(float(probs[first + k][label != value].mean()))
        out = {
            **what, "steps": res["steps"], "val_dice": {k.split("dice_")[1]: round(v, 3) for k, v in res["best"]["metrics"].items() if "dice_" in k},
            "mean_probability_inside": {k: round(float(np.mean(v)), 3) for k, v in inside.items()},
            "mean_probability_outside": {k: round(float(np.mean(v)), 3) for k, v in outside.items()},
        }  # fmt: skip
        out["val_dice_mean"] = round(float(np.mean(list(out["val_dice"].values()))), 3)
        print(json.dumps(out), flush=True)
        return out

    split = {"train": ids["train"], "val": ids["val"]}
    if a.expert:
        from medalloy.planning.fingerprint import fingerprint
        from medalloy.planning.planner import plan_dataset
        from medalloy.predict import load_model
        from medalloy.recipes.expert import train_expert

        run = a.work / "runs" / "diagnose" / "acdc-expert"
        plan = plan_dataset(ds, fingerprint(ds, progress=False), **PLAN_OPTIONS[name])
        res = train_expert(folder, run, plan=plan, split=split, overwrite=True, progress=sys.stderr.isatty(), steps=a.steps, val_every=a.steps)
        model, plan, _ = load_model(run / "checkpoints" / "last.safetensors")
        rows.append(row({"model": "expert (softmax Dice + CE)", "lr": 3e-3}, res, Predictor(model, plan), 1))
    for lr, class_loss, prior in [(lr, c, p) for p in a.prior_probability for c in a.class_loss for lr in a.lr]:
        prior = None if prior == "none" else float(prior)
        cfg = UniversalConfig(plan_options={name: PlanOptions(**PLAN_OPTIONS[name])}, priors="none", class_loss=class_loss, prior_probability=prior)
        cfg.train.steps, cfg.train.val_every, cfg.train.lr = a.steps, a.steps, lr
        run = a.work / "runs" / "diagnose" / f"acdc-alone-{class_loss}-prior{prior}-lr{lr:g}"
        res = train_universal([folder], run, config=cfg, overwrite=True, progress=sys.stderr.isatty(), splits={name: split})
        model, plan, _ = load_checkpoint_model(run / "checkpoints" / "last.safetensors", "cpu", name)
        what = {
            "model": f"universal, no priors, class_loss {class_loss}, prior_probability {prior}",
            "class_loss": class_loss,
            "prior_probability": prior,
            "lr": lr,
        }
        rows.append(row(what, res, Predictor(model, plan, activation="sigmoid"), 0))
    a.results.mkdir(parents=True, exist_ok=True)
    (a.results / "diagnose.json").write_text(json.dumps({"dataset": name, "priors": "none", "rows": rows}, indent=2) + "\n", encoding="utf-8")
    return 0


def mix(a: argparse.Namespace, name: str) -> int:
    """ACDC with neighbours, a fixed number of steps: ACDC's validation Dice against the others'."""
    from medalloy.planning.multi_dataset import PlanOptions
    from medalloy.recipes.universal import UniversalConfig, train_universal

    names = [name, *a.mix]
    folders = [member_folder(n, a.data, a.work) for n in names]
    ids = {n: splits(n, dataset_path(n, a.data, a.work), 0) for n in names}
    cfg = UniversalConfig(
        plan_options={n: PlanOptions(**PLAN_OPTIONS.get(n, {})) for n in names},
        priors=a.priors,
        dataset_weighting=a.weighting,
        patch_size=a.patch,
        datasets_per_step=a.datasets_per_step,
    )
    cfg.train.steps, cfg.train.val_every, cfg.train.lr, cfg.train.seed = a.steps, a.steps, a.lr[0], a.seed
    run = (
        a.work
        / "runs"
        / "diagnose"
        / f"mix-{'+'.join(names)}-{a.weighting}-{a.priors.replace('+', '')}-{a.steps}{f'-patch{a.patch}' if a.patch else ''}{f'-dps{a.datasets_per_step}' if a.datasets_per_step > 1 else ''}{f'-seed{a.seed}' if a.seed else ''}"
    )
    res = train_universal(
        folders, run, config=cfg, overwrite=True, progress=sys.stderr.isatty(), splits={n: {"train": ids[n]["train"], "val": ids[n]["val"]} for n in names}
    )
    dice = {k.removeprefix("val/"): round(v, 3) for k, v in res["best"]["metrics"].items() if "/dice_" in k}
    acdc = {k.split("dice_")[1]: v for k, v in dice.items() if k.startswith(f"{name}/")}
    row = {
        "mix": names, "patch": a.patch, "datasets_per_step": a.datasets_per_step, "weighting": a.weighting, "priors": a.priors, "steps": res["steps"], "lr": a.lr[0], "seed": a.seed, "minutes": round(res["seconds"] / 60, 2),
        "acdc_val_dice": acdc, "acdc_val_dice_mean": round(float(np.mean(list(acdc.values()))), 3),
        "others_val_dice": {k: v for k, v in dice.items() if not k.startswith(f"{name}/")},
    }  # fmt: skip
    print(json.dumps(row), flush=True)
    a.results.mkdir(parents=True, exist_ok=True)
    out = a.results / "diagnose_mix.json"
    rows = json.loads(out.read_text(encoding="utf-8"))["rows"] if out.exists() else []
    out.write_text(json.dumps({"rows": [*rows, row]}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
