"""Experts: one nnU-Net-style U-Net per dataset (MONAI DynUNet from the plan, Dice + CE, MONAI
augmentation, foreground-oversampled patches), trained by the shared engine.

Run folder (``--out RUN``)::

    RUN/run.json              what was trained, on which cases, with which result
    RUN/plan.json             the plan used (editable copy)
    RUN/config.yaml           the resolved configuration
    RUN/split.json            training and validation case ids
    RUN/metrics.jsonl         training and validation rows
    RUN/training_curve.png
    RUN/checkpoints/{best,last}.safetensors (+ .json)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tqdm.auto import tqdm

from medalloy.data.dataset import Case, RawDataset
from medalloy.data.preprocess import PreparedCase, foreground_coords, pad_to_patch, to_network_space
from medalloy.data.sampling import PatchSampler
from medalloy.data.transforms import AugmentConfig
from medalloy.engine import checkpoint as ckpt
from medalloy.engine.inference import Predictor
from medalloy.engine.seed import seed_everything, step_rng
from medalloy.engine.trainer import TrainConfig, Trainer, TrainSpec
from medalloy.errors import MedalloyError
from medalloy.jsonio import write_json_atomic
from medalloy.losses import DiceCELoss
from medalloy.models.unet import build_unet, count_parameters
from medalloy.planning.plan import Plan, load_plan, save_plan
from medalloy.recipes.config import load_recipe_config
from medalloy.runs import prepare_output

METHOD = "expert"


class ExpertConfig(BaseModel):
    """Everything of an expert run that is not in the plan (YAML: ``--config CFG.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=1000, val_every=100, lr=3e-3))
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    fold: int = 0
    folds: int = 5
    max_val_cases: int = 16
    batch_size: int | None = None


def load_config(path: str | Path | None, **overrides: Any) -> ExpertConfig:
    """Read a YAML config (if any) and apply CLI overrides (``steps=...`` goes to ``train.steps``)."""
    return load_recipe_config(ExpertConfig, path, ("fold", "batch_size"), overrides)


def prepare_cases(dataset: RawDataset, cases: list[Case], plan: Plan, pad: bool, seed: int, desc: str, progress: bool = True) -> list[PreparedCase]:
    """Read, move to network space, pad to the patch and index foreground, once per case (cached)."""
    out = []
    for case in tqdm(cases, desc=desc, unit="case", disable=not progress, leave=False):
        image, label, meta = dataset.load(case)
        image, label = to_network_space(image, label, meta, plan, case.images[0])
        pads: list = []
        if pad:
            image, label, pads = pad_to_patch(image, label, plan.patch_size)
        fg = foreground_coords(label, plan.num_classes, step_rng(seed, "fg", case.case_id)) if label is not None else {}
        out.append(PreparedCase(case.case_id, image, label, meta, case.source, fg, pads))
    return out


def make_validate(predictor_factory: Callable[[], Predictor], cases: list[PreparedCase], plan: Plan) -> Callable:
    """Validation: whole-case prediction in network space, Dice per class over the validation cases."""
    from medalloy.engine.metrics import batch_dice

    names = {i: name for name, v in plan.labels.items() for i, lv in enumerate(plan.label_values) if lv == v}

    def validate(models: dict) -> dict[str, float]:
        predictor = predictor_factory()
        per_class = []
        for c in cases:
            probs = predictor.predict_network_space(c.image)
            pred = probs.argmax(0)
            target = torch.from_numpy(c.label.astype(np.int64))
            per_class.append(batch_dice(pred[None], target[None], plan.num_classes))
        dice = torch.stack(per_class).mean(0)
        metrics = {f"val/dice_{names[k + 1]}": float(d) for k, d in enumerate(dice)}
        metrics["val/dice"] = float(dice.mean())
        return metrics

    return validate


def _explicit_split(ds: RawDataset, split: dict[str, list[str]]) -> tuple[list[Case], list[Case]]:
    known = {c.case_id: c for c in ds.cases}
    unknown = [i for part in ("train", "val") for i in split.get(part, []) if i not in known]
    if unknown:
        raise MedalloyError(f"split names cases not in the dataset: {unknown[:5]}", ds.root, "use case ids of imagesTr/")
    if not split.get("train"):
        raise MedalloyError("split has no training cases", ds.root, "give a non-empty 'train' list")
    return [known[i] for i in split["train"]], [known[i] for i in split.get("val", [])]


def train_expert(
    dataset: str | Path,
    out: str | Path,
    plan: str | Path | Plan | None = None,
    config: str | Path | ExpertConfig | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    split: dict[str, list[str]] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train one expert on ``dataset`` (an nnU-Net raw folder); returns the run summary (``run.json``).

    ``split`` (``{"train": [ids], "val": [ids]}``) replaces the fold's split, e.g. to keep a test
    set out of both training and model selection."""
    from medalloy.data.splits import split_for_fold
    from medalloy.planning.fingerprint import fingerprint
    from medalloy.planning.planner import plan_dataset

    ds = RawDataset(dataset)
    cfg = config if isinstance(config, ExpertConfig) else load_config(config, **overrides)
    cfg.train.progress = cfg.train.progress and progress
    if not ds.labelled_cases():
        raise MedalloyError("no labelled cases", ds.root / "labelsTr", "put a label file per case in labelsTr/")
    run = prepare_output(out, overwrite=overwrite, resume=resume)
    if isinstance(plan, Plan):
        the_plan = plan
    elif plan is not None:
        the_plan = load_plan(plan)
    elif resume and (run / "plan.json").exists():
        the_plan = load_plan(run / "plan.json")
    else:
        the_plan = plan_dataset(ds, fingerprint(ds, progress=progress))
    if cfg.batch_size:
        the_plan = the_plan.model_copy(update={"batch_size": cfg.batch_size})
    missing = sorted(set(ds.spec.labels.values()) - set(the_plan.label_values))
    if missing:
        raise MedalloyError(f"plan lacks label values {missing} of the dataset", plan, "make a new plan for this dataset")
    save_plan(the_plan, run / "plan.json")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")

    if split is not None:
        train_cases, val_cases = _explicit_split(ds, split)
    else:
        train_cases, val_cases = split_for_fold(ds, cfg.fold, k=cfg.folds, seed=cfg.train.seed)
    train_cases = [c for c in train_cases if c.label is not None]
    val_cases = [c for c in val_cases if c.label is not None][: cfg.max_val_cases]
    write_json_atomic(run / "split.json", {"fold": cfg.fold, "train": [c.case_id for c in train_cases], "val": [c.case_id for c in val_cases]})
    write_json_atomic(run / "run.json", {"method": METHOD, "dataset": str(ds.root), "status": "training"})

    seed = cfg.train.seed
    train_prep = prepare_cases(ds, train_cases, the_plan, pad=True, seed=seed, desc=f"{ds.name}: caching train", progress=progress)
    val_prep = prepare_cases(ds, val_cases, the_plan, pad=False, seed=seed, desc=f"{ds.name}: caching val", progress=progress)

    seed_everything(seed)
    model = build_unet(the_plan)
    loss_fn = DiceCELoss()
    sampler = PatchSampler(train_prep, the_plan.patch_size, the_plan.batch_size, the_plan.dim, seed, the_plan.foreground_oversample, cfg.augment)

    def step_fn(models: dict, batch: dict) -> dict[str, torch.Tensor]:
        logits = models["net"](batch["image"])
        if logits.ndim == batch["image"].ndim + 1:  # deep supervision: (B, heads, K, ...) -> main head
            logits = logits[:, 0]
        return {"loss": loss_fn(logits, batch["label"])}

    def predictor() -> Predictor:
        return Predictor(model, the_plan, device=next(model.parameters()).device, precision=cfg.train.precision, channels_last=False)

    record = {
        "method": METHOD,
        "name": f"expert-{ds.name}",
        "tasks": [{"dataset": ds.name, "labels": ds.spec.labels, "modality": ds.spec.modality, "file_ending": ds.spec.file_ending}],
        "plan": the_plan.model_dump(mode="json"),
        "params": count_parameters(model),
    }
    spec = TrainSpec(
        models={"net": model},
        trainable=["net"],
        step_fn=step_fn,
        batches=sampler,
        record=record,
        validate=make_validate(predictor, val_prep, the_plan) if val_prep else None,
    )
    summary = Trainer(spec, cfg.train, run).fit(resume=resume)
    result = {
        "method": METHOD,
        "dataset": str(ds.root),
        "name": ds.name,
        "status": "done",
        "fold": cfg.fold,
        "train_cases": len(train_prep),
        "val_cases": len(val_prep),
        "params": record["params"],
        **summary,
    }
    write_json_atomic(run / "run.json", result)
    return result


def load_expert(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, Plan, dict[str, Any]]:
    """Network, plan and record of an expert checkpoint (``.safetensors``)."""
    tensors, record = ckpt.load_checkpoint(path, method=METHOD, map_location=device)
    try:
        plan = Plan.model_validate(record["plan"])
    except (KeyError, ValidationError):
        raise MedalloyError("checkpoint record has no valid plan", path, "retrain with this medalloy version") from None
    model = build_unet(plan)
    state = ckpt.group(tensors, "model/net")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise MedalloyError(f"weights do not fit the plan's network ({str(exc).splitlines()[0]})", path, "use the checkpoint with its own run") from None
    return model.eval(), plan, record
