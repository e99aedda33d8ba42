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

from pathlib import Path
from typing import Any, ClassVar

import torch
from monai.losses import DeepSupervisionLoss
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medalloy.data.dataset import RawDataset
from medalloy.data.sampling import PatchSampler
from medalloy.data.transforms import AugmentConfig
from medalloy.engine import checkpoint as ckpt
from medalloy.engine.inference import Predictor
from medalloy.engine.trainer import TrainConfig, TrainSpec
from medalloy.errors import MedalloyError
from medalloy.losses import DiceCELoss
from medalloy.models.image_encoder import load_encoder_into
from medalloy.models.unet import build_unet, count_parameters
from medalloy.planning.plan import NetworkPlan, Plan, save_plan
from medalloy.recipes.config import load_recipe_config
from medalloy.recipes.init_weights import InitEncoder, adopt_encoder_network, read_init_encoder
from medalloy.recipes.registry import register
from medalloy.recipes.spec import ModelSpec, read_spec, register_spec
from medalloy.recipes.scaffold import (
    Run,
    ValidationSet,
    cache_cases,
    cases_of,
    choose_split,
    dice_validation,
    given_or_kept_plan,
    open_run,
    require_labelled,
    resolve_config,
    task_entry,
)
from medalloy.seeding import seed_everything

METHOD = "expert"
TOP_KEYS = ("fold", "batch_size")


class ExpertConfig(BaseModel):
    """Everything of an expert run that is not in the plan (YAML: ``--config CFG.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=1000, val_every=100, lr=3e-3))
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    fold: int = 0
    folds: int = 5
    max_val_cases: int = 16
    batch_size: int | None = None


class ExpertSpec(ModelSpec):
    """A DynUNet, nnU-Net's network: ``(B, in_channels, *patch) -> (B, out_channels, *patch)``
    (while training with deep supervision: ``(B, heads, out_channels, *patch)``)."""

    METHOD: ClassVar[str] = METHOD

    network: NetworkPlan
    in_channels: int = Field(ge=1)
    out_channels: int = Field(ge=2)

    @classmethod
    def of_plan(cls, plan: Plan) -> ExpertSpec:
        """The network a plan describes, for its channels and classes."""
        return cls(network=plan.network, in_channels=plan.in_channels, out_channels=plan.num_classes)


def _spec_from_v0(record: dict[str, Any], _tensors: Any) -> dict[str, Any]:
    """Records before specs: the network was the plan's."""
    plan = record["plan"]
    return {"network": plan["network"], "in_channels": plan["in_channels"], "out_channels": len(plan["label_values"])}


register_spec(ExpertSpec, {0: _spec_from_v0})


def load_config(path: str | Path | None, **overrides: Any) -> ExpertConfig:
    """Read a YAML config (if any) and apply CLI overrides (``steps=...`` goes to ``train.steps``)."""
    return load_recipe_config(ExpertConfig, path, TOP_KEYS, overrides)


def deep_supervision_weights(n_outputs: int) -> list[float]:
    """nnU-Net's weights for the full-resolution output and the coarser heads: 1, 1/2, 1/4, ...
    normalised to sum to 1."""
    w = [0.5**i for i in range(n_outputs)]
    return [x / sum(w) for x in w]


def expert_loss(plan: Plan):
    """Dice + CE on the logits; with deep supervision, on every head (MONAI returns them upsampled
    to the patch as ``(B, heads, K, *sp)``) with nnU-Net's weights, so no head is built unused."""
    base = DiceCELoss()
    if not plan.network.deep_supervision:
        return base
    ds_loss = DeepSupervisionLoss(base)

    def loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        heads = list(torch.unbind(logits, dim=1))
        ds_loss.weights = deep_supervision_weights(len(heads))
        return ds_loss(heads, label)

    return loss


def _choose_plan(run: Run, ds: RawDataset, plan: str | Path | Plan | None, cfg: ExpertConfig, progress: bool, init: InitEncoder | None = None) -> Plan:
    """Rank 0: the given plan, the resumed run's own, or a new one (with ``init``: on the
    encoder's network); saved as ``plan.json``."""
    from medalloy.planning.fingerprint import fingerprint
    from medalloy.planning.planner import plan_dataset

    def new_plan() -> Plan:
        made = plan_dataset(ds, fingerprint(ds, progress=progress))
        return made if init is None else adopt_encoder_network(made, init)

    the_plan = given_or_kept_plan(run, plan, new_plan)
    if cfg.batch_size:
        the_plan = the_plan.model_copy(update={"batch_size": cfg.batch_size})
    missing = sorted(set(ds.spec.labels.values()) - set(the_plan.label_values))
    if missing:
        raise MedalloyError(f"plan lacks label values {missing} of the dataset", plan, "make a new plan for this dataset")
    save_plan(the_plan, run.out / "plan.json")
    return the_plan


def train_expert(
    dataset: str | Path,
    out: str | Path,
    plan: str | Path | Plan | None = None,
    config: str | Path | ExpertConfig | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    split: dict[str, list[str]] | None = None,
    init: str | Path | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train one expert on ``dataset`` (an nnU-Net raw folder); returns the run summary (``run.json``).

    ``split`` (``{"train": [ids], "val": [ids]}``) replaces the fold's split, e.g. to keep a test
    set out of both training and model selection. ``init``: a pretrain or expert run (or its
    checkpoint) whose encoder the network starts from (:mod:`medalloy.recipes.init_weights`)."""
    ds = RawDataset(dataset)
    cfg = resolve_config(ExpertConfig, config, overrides, progress, TOP_KEYS)
    require_labelled(ds)
    init_enc = read_init_encoder(init) if init is not None else None  # refused before the run folder is touched
    run = open_run(out, cfg.train, overwrite=overwrite, resume=resume, progress=progress)
    the_plan = run.main(lambda: _choose_plan(run, ds, plan, cfg, progress, init_enc))
    run.write_config(cfg)
    ids = run.main(lambda: choose_split(run, ds, cfg, split))
    run.write_json("split.json", {"fold": cfg.fold, **ids})
    run.status(METHOD, dataset=str(ds.root))

    seed = cfg.train.seed
    train_prep = cache_cases(ds, cases_of(ds, ids["train"]), the_plan, pad=True, seed=seed, desc=f"{ds.name}: caching train", progress=run.progress)
    val_prep = cache_cases(ds, cases_of(ds, ids["val"]), the_plan, pad=False, seed=seed, desc=f"{ds.name}: caching val", progress=run.progress)

    seed_everything(seed)
    model = build_unet(the_plan.network, the_plan.in_channels, the_plan.num_classes)
    if init_enc is not None:
        load_encoder_into(model, init_enc.state, init_enc.path)
    loss_fn = expert_loss(the_plan)
    sampler = PatchSampler(train_prep, the_plan.patch_size, the_plan.batch_size, the_plan.dim, seed, the_plan.foreground_oversample, cfg.augment)

    def step_fn(models: dict, batch: dict) -> dict[str, torch.Tensor]:
        return {"loss": loss_fn(models["net"](batch["image"]), batch["label"])}

    def predictor() -> Predictor:
        return Predictor(model, the_plan, device=next(model.parameters()).device, precision=cfg.train.precision, channels_last=False)

    record = {
        "method": METHOD,
        "name": f"expert-{ds.name}",
        "tasks": [task_entry(ds)],
        "plan": the_plan.model_dump(mode="json"),
        "params": count_parameters(model),
        "init": None if init_enc is None else {"path": str(init_enc.path), "method": init_enc.method},
    }
    spec = TrainSpec(
        models={"net": model},
        trainable=["net"],
        step_fn=step_fn,
        batches=sampler,
        record=record,
        validate=dice_validation([ValidationSet(predictor, val_prep, the_plan)]) if val_prep else None,
    )
    summary = run.train(spec, cfg.train)
    result = {
        "method": METHOD,
        "dataset": str(ds.root),
        "name": ds.name,
        "status": "done",
        "fold": cfg.fold,
        "train_cases": len(train_prep),
        "val_cases": len(val_prep),
        "params": record["params"],
        "init": record["init"],
        **summary,
    }
    run.write_json("run.json", result)
    return result


def load_expert(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, Plan, dict[str, Any]]:
    """Network, plan and record of an expert checkpoint (``.safetensors``)."""
    tensors, record = ckpt.load_checkpoint(path, method=METHOD, map_location=device)
    try:
        plan = Plan.model_validate(record["plan"])
    except (KeyError, ValidationError):
        raise MedalloyError("checkpoint record has no valid plan", path, "retrain with this medalloy version") from None
    model = build_unet(plan.network, plan.in_channels, plan.num_classes)
    ckpt.load_module_state(model, ckpt.group(tensors, "model/net"), path, "net", "use the checkpoint with its own run")
    return model.eval(), plan, record


register(METHOD, lambda path, device, dataset=None: load_expert(path, device))
