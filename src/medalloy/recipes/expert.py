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
from pydantic import Field, ValidationError

from medalloy.data.dataset import RawDataset
from medalloy.data.sampling import PatchSampler
from medalloy.engine import checkpoint as ckpt
from medalloy.engine.inference import Predictor
from medalloy.engine.trainer import TrainConfig, TrainSpec
from medalloy.errors import MedalloyError
from medalloy.losses import DiceCELoss
from medalloy.models.image_encoder import load_encoder_into
from medalloy.models.unet import build_unet, count_parameters
from medalloy.planning.budget import samples_per_epoch
from medalloy.planning.plan import NetworkPlan, Plan, save_plan
from medalloy.recipes.config import SegmentationConfig, load_recipe_config
from medalloy.recipes.init_weights import InitEncoder, adopt_encoder_network, read_init_encoder
from medalloy.recipes.registry import register
from medalloy.recipes.scaffold import (
    Recipe,
    Run,
    ValidationSet,
    cache_cases,
    cases_of,
    dataset_splits,
    dice_validation,
    given_or_kept_plan,
    require_labelled,
    resolve_config,
    run_recipe,
    split_record,
    task_entry,
)
from medalloy.recipes.spec import ModelSpec, read_spec, register_spec
from medalloy.seeding import seed_everything

METHOD = "expert"


class ExpertConfig(SegmentationConfig):
    """Everything of an expert run that is not in the plan (YAML: ``--config CFG.yaml``)."""

    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=1000, val_every=100, lr=3e-3))
    plan_for_budget: bool = Field(
        True,
        description="with train.time_budget_minutes and no plan given: the finest resolution and width expected to converge in the budget, "
        "from step times measured on this machine (planning/budget.py; plan.json says why)",
    )


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
    """Read a YAML config (if any) and apply overrides (``steps=...`` goes to ``train.steps``)."""
    return load_recipe_config(ExpertConfig, path, overrides)


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


def _choose_plan(
    run: Run,
    ds: RawDataset,
    plan: str | Path | Plan | None,
    cfg: ExpertConfig,
    progress: bool,
    init: InitEncoder | None = None,
    split: dict[str, list[str]] | None = None,
) -> Plan:
    """Rank 0: the given plan, the resumed run's own, or a new one (with a time budget: the budget
    planner's; with ``init``: on the encoder's network); saved as ``plan.json``."""
    from medalloy.planning.fingerprint import fingerprint
    from medalloy.planning.planner import plan_dataset

    def new_plan() -> Plan:
        fp = fingerprint(ds, progress=progress)
        minutes = cfg.train.time_budget_minutes
        if minutes and cfg.plan_for_budget and init is None:  # an encoder to start from fixes the network
            from medalloy.planning.budget import choose_for_budget
            from medalloy.planning.planner import train_cases_of
            from medalloy.recipes.step_timing import budget_timing

            timing = budget_timing(cfg.train.device)
            cases = len(split["train"]) if split else train_cases_of(ds, cfg.folds)
            return choose_for_budget(ds, fp, minutes, timing["step_seconds"], cases, machine=timing["machine"])
        made = plan_dataset(ds, fp)
        return made if init is None else adopt_encoder_network(made, init)

    the_plan = given_or_kept_plan(run, plan, new_plan)
    if cfg.batch_size:
        the_plan = the_plan.model_copy(update={"batch_size": cfg.batch_size})
    missing = sorted(set(ds.spec.labels.values()) - set(the_plan.label_values))
    if missing:
        raise MedalloyError(f"plan lacks label values {missing} of the dataset", plan, "make a new plan for this dataset")
    save_plan(the_plan, run.out / "plan.json")
    return the_plan


def build_expert(spec: ExpertSpec) -> torch.nn.Module:
    """The network ``spec`` describes (random weights): for training and for loading alike."""
    return build_unet(spec.network, spec.in_channels, spec.out_channels)


class ExpertRecipe(Recipe[ExpertConfig]):
    """One expert on one dataset: its plan, the fold's split, a DynUNet trained with Dice + CE."""

    METHOD = METHOD

    def __init__(
        self, cfg: ExpertConfig, ds: RawDataset, plan: str | Path | Plan | None = None, split: dict[str, list[str]] | None = None,
        init: str | Path | None = None, progress: bool = True,
    ):  # fmt: skip
        super().__init__(cfg, progress)
        self.ds, self.given_plan, self.given_split, self.init = ds, plan, split, init

    def check(self) -> None:
        require_labelled(self.ds)
        self.init_enc = read_init_encoder(self.init) if self.init is not None else None  # refused before the run folder is touched

    def inputs(self) -> dict[str, Any]:
        return {"dataset": str(self.ds.root)}

    def prepare(self, run: Run) -> None:
        self.plan = run.main(lambda: _choose_plan(run, self.ds, self.given_plan, self.cfg, self.progress, self.init_enc, self.given_split))

    def choose_split(self, run: Run) -> dict[str, Any]:
        given = None if self.given_split is None else {self.ds.name: self.given_split}
        return split_record(self.cfg.fold, dataset_splits(run, [self.ds], self.cfg, given))

    def train_spec(self, run: Run, split: dict[str, Any]) -> TrainSpec:
        ds, plan, cfg, seed, ids = self.ds, self.plan, self.cfg, self.cfg.train.seed, split["datasets"][self.ds.name]
        self.train_prep = cache_cases(ds, cases_of(ds, ids["train"]), plan, pad=True, seed=seed, desc=f"{ds.name}: caching train", progress=run.progress)
        self.val_prep = cache_cases(ds, cases_of(ds, ids["val"]), plan, pad=False, seed=seed, desc=f"{ds.name}: caching val", progress=run.progress)
        seed_everything(seed)
        spec = ExpertSpec.of_plan(plan)
        model = build_expert(spec)
        if self.init_enc is not None:
            load_encoder_into(model, self.init_enc.state, self.init_enc.path)
        loss_fn = expert_loss(plan)
        sampler = PatchSampler(self.train_prep, plan.patch_size, plan.batch_size, plan.dim, seed, plan.foreground_oversample, cfg.augment)

        def step_fn(models: dict, batch: dict) -> dict[str, torch.Tensor]:
            return {"loss": loss_fn(models["net"](batch["image"]), batch["label"])}

        def predictor() -> Predictor:
            return Predictor(model, plan, device=next(model.parameters()).device, precision=cfg.train.precision, channels_last=False)

        self.record = {
            "method": METHOD,
            "name": f"expert-{ds.name}",
            "tasks": [task_entry(ds)],
            "spec": spec.to_record(),
            "plan": plan.model_dump(mode="json"),
            "params": count_parameters(model),
            "init": None if self.init_enc is None else {"path": str(self.init_enc.path), "method": self.init_enc.method},
        }
        validate = dice_validation([ValidationSet(predictor, self.val_prep, plan, ds.name)]) if self.val_prep else None
        return TrainSpec(models={"net": model}, trainable=["net"], step_fn=step_fn, batches=sampler, record=self.record, validate=validate)

    def result(self, summary: dict[str, Any]) -> dict[str, Any]:
        r = self.record
        out = {
            "name": self.ds.name,
            "fold": self.cfg.fold,
            "train_cases": len(self.train_prep),
            "val_cases": len(self.val_prep),
            "params": r["params"],
            "init": r["init"],
        }
        if self.plan.budget is not None:  # what the budget planner expected, against what the run did
            expected = next(c for c in self.plan.budget.candidates if c.name == self.plan.budget.chosen)
            steps = int(summary.get("steps") or 0)
            out["budget_check"] = {
                "expected_steps": expected.expected_steps, "steps": steps, "expected_epochs": expected.expected_epochs,
                "epochs": round(steps * self.plan.batch_size / samples_per_epoch(self.plan, max(1, len(self.train_prep))), 1),
                "min_epochs": self.plan.budget.min_epochs,
            }  # fmt: skip
        return out


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
    cfg = resolve_config(ExpertConfig, config, overrides, progress)
    return run_recipe(ExpertRecipe(cfg, ds, plan, split, init, progress), out, resume=resume, overwrite=overwrite, progress=progress)


def load_expert(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, Plan, dict[str, Any]]:
    """Network, plan and record of an expert checkpoint (``.safetensors``); the record's ``spec``
    is the current version's (records of earlier versions migrated)."""
    tensors, record = ckpt.load_checkpoint(path, method=METHOD, map_location=device)
    spec = read_spec(ExpertSpec, record, path, tensors.keys())
    try:
        plan = Plan.model_validate(record["plan"])
    except (KeyError, ValidationError):
        raise MedalloyError("checkpoint record has no valid plan", path, "retrain with this medalloy version") from None
    model = build_expert(spec)
    ckpt.load_module_state(model, ckpt.group(tensors, "model/net"), path, "net", "use the checkpoint with its own run")
    return model.eval(), plan, {**record, "spec": spec.to_record()}


register(METHOD, lambda path, device, dataset=None: load_expert(path, device))
