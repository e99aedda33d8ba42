"""Universal model (Hermes): one 2D or 3D network for the tasks of several datasets, conditioned
on task and modality priors, trained with partial labels.

Tasks and modalities come from the datasets themselves: a task is a label *name* (so "lung" of a
lung+heart dataset and "lung" of a lung-only dataset are one task; ``task_names`` renames), a
modality is ``dataset.json["medalloy"]["modality"]`` (else the first channel name), compared
case-insensitively. Each dataset keeps its own preprocessing plan (spacing, normalisation; in 2D,
3D volumes are sliced along their coarsest axis) and all share one network.

Field of view: by default each dataset keeps its own plan's patch and batch size (whole images
where its expert would use them) and each optimizer step averages the losses of ``datasets_per_step``
distinct datasets' batches (2 by default; docs/research/hermes.md "Two datasets a step"), drawn by ``dataset_weighting``;
the network is the planner's topology of the plan with the most stages, and the other datasets'
patches are padded up to its poolings. ``patch_size`` instead gives every dataset one square (cube)
patch and mixes datasets within each batch, as the paper does.

Run folder (``--out RUN``) as for experts: ``run.json``, ``config.yaml``, ``split.json`` (per
dataset), ``plans/<dataset>.json``, ``metrics.jsonl``, ``training_curve.png``,
``checkpoints/{best,last}.safetensors``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError

from medalloy.data.dataset import RawDataset
from medalloy.data.mixed import MixedSampler
from medalloy.engine import checkpoint as ckpt
from medalloy.engine.trainer import TrainConfig, TrainSpec
from medalloy.errors import MedalloyError
from medalloy.losses import TaskBCEDiceLoss
from medalloy.models.hermes import HermesNet, build_hermes
from medalloy.models.unet import count_parameters
from medalloy.planning.multi_dataset import MIXED_BATCH, universal_plans
from medalloy.planning.plan import NetworkPlan, Plan
from medalloy.recipes.config import MultiDatasetConfig, load_recipe_config
from medalloy.recipes.multitask import MultiDatasetRecipe, TaskRegistry, register_multitask
from medalloy.recipes.scaffold import Run, resolve_config, run_recipe, task_entry
from medalloy.recipes.spec import ModelSpec, read_spec, register_spec
from medalloy.seeding import seed_everything

METHOD = "universal"


class UniversalConfig(MultiDatasetConfig):
    """Everything of a universal run besides the datasets (YAML: ``--config CFG.yaml``)."""

    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=2000, val_every=200, lr=2e-3))
    patch_size: int | None = Field(None, ge=16)  # None: each dataset's own plan patch; a side: one shared patch, mixed batches
    batch_size: int | None = Field(None, ge=1, description="patches per step (default: each plan's own with per-dataset batches, 12 with mixed ones)")
    priors: Literal["task+modality", "task", "none"] = Field("task+modality", description="ablations: task priors only, or none (one head per task)")
    fusion_width: int | None = Field(64, ge=8)  # fusion layers at min(channels, width); None: at the backbone's width
    fusion_finest_skipped: int = Field(2, ge=0)  # never at the two finest scales, as the paper
    fusion_scales: int | None = Field(
        1, ge=1
    )  # at the bottleneck (measured: docs/research/hermes.md "Fusion at the bottleneck"; 3: the paper's placement, None: all but the finest)
    fusion_depth: int = Field(1, ge=1)
    tokens_per_modality: int = Field(10, ge=1)
    modality_weight: float = Field(0.01, ge=0.0)
    task_anchors: bool = True  # a learned vector per task added to its prototype: tasks start apart (docs/research/hermes.md "Task anchors")
    prior_init_std: float = Field(
        0.02, gt=0.0
    )  # task and modality tokens start at N(0, std^2) (1.0 measured worse: docs/research/hermes.md "What the task head learns")
    fusion_identity_init: bool = True  # fusion layers start as the identity, prototypes as their anchors (docs/research/hermes.md)


class UniversalSpec(ModelSpec):
    """A :class:`~medalloy.models.hermes.HermesNet`: ``(B, in_channels, *patch)`` and per-sample
    task and modality ids -> ``(B, tasks asked, *patch)`` logits, on the DynUNet ``network``
    (fields named as in :class:`UniversalConfig`)."""

    METHOD: ClassVar[str] = METHOD

    network: NetworkPlan
    in_channels: int = Field(ge=1)
    n_tasks: int = Field(ge=1)
    n_modalities: int = Field(ge=1)  # the last one is "unknown"
    priors: Literal["task+modality", "task", "none"]
    fusion_width: int | None
    fusion_finest_skipped: int
    fusion_scales: int | None
    fusion_depth: int
    tokens_per_modality: int
    prior_probability: float | None
    task_anchors: bool
    fusion_identity_init: bool
    prior_init_std: float


def build_universal(spec: UniversalSpec) -> HermesNet:
    """The network ``spec`` describes (random weights): for training and for loading alike."""
    return build_hermes(
        spec.network, spec.n_tasks, spec.n_modalities, in_channels=spec.in_channels, depth=spec.fusion_depth,
        tokens_per_modality=spec.tokens_per_modality, fusion_width=spec.fusion_width, priors=spec.priors, finest_skipped=spec.fusion_finest_skipped,
        prior_probability=spec.prior_probability, fusion_scales=spec.fusion_scales, task_anchors=spec.task_anchors,
        identity_init=spec.fusion_identity_init, prior_init_std=spec.prior_init_std,
    )  # fmt: skip


def _spec_from_v0(record: dict[str, Any], _tensors: Any) -> dict[str, Any]:
    """Records before specs: the network and channels at the top, the options under ``model`` with
    two names of their own; records older than every option are not read."""
    model, registry = record["model"], record["registry"]
    renamed = {"finest_skipped": "fusion_finest_skipped", "identity_init": "fusion_identity_init"}
    return {
        "network": record["network"], "in_channels": record["in_channels"], "n_tasks": len(registry["tasks"]),
        "n_modalities": len(registry["modalities"]), **{renamed.get(k, k): v for k, v in model.items()},
    }  # fmt: skip


register_spec(UniversalSpec, {0: _spec_from_v0})


def load_config(path: str | Path | None, **overrides: Any) -> UniversalConfig:
    """YAML config (if any) with CLI overrides (``steps``, ``lr``, ... go to ``train``)."""
    return load_recipe_config(UniversalConfig, path, overrides)


class UniversalRecipe(MultiDatasetRecipe[UniversalConfig]):
    """One Hermes network for the tasks of several datasets (task and modality priors, partial labels)."""

    METHOD = METHOD

    def make_plans(self, owns: dict[str, Plan], values: dict[str, list[int]]) -> dict[str, Plan]:
        c = self.cfg
        return universal_plans(owns, values, c.patch_size, c.batch_size, c.base_filters, c.max_filters, c.dim, c.datasets_per_step)

    def train_spec(self, run: Run, split: dict[str, Any]) -> TrainSpec:
        cfg, registry = self.cfg, self.registry
        self.load_sources(run, split)
        seed_everything(cfg.train.seed)
        network = self.plans[self.dss[0].name].network
        spec = UniversalSpec.from_config(cfg, network=network, in_channels=self.in_channels, n_tasks=len(registry.tasks), n_modalities=len(registry.modalities))
        net = build_universal(spec)
        per_dataset = cfg.patch_size is None
        batches = MixedSampler(
            self.sources, cfg.batch_size or MIXED_BATCH, self.in_channels, registry.null_task, cfg.train.seed, foreground_oversample=0.33,
            per_dataset=per_dataset, datasets_per_step=cfg.datasets_per_step if per_dataset else 1,
        )  # fmt: skip
        self.record = {
            "method": METHOD,
            "name": "universal-" + "+".join(ds.name for ds in self.dss),
            "tasks": [task_entry(ds) for ds in self.dss],
            "registry": registry.model_dump(mode="json"),
            "plans": {k: p.model_dump(mode="json") for k, p in self.plans.items()},
            "spec": spec.to_record(),
            "activation": "sigmoid",
            "params": count_parameters(net),
        }
        step_fn = universal_step(cfg, registry, [src.name for src in self.sources])
        return TrainSpec(models={"net": net}, trainable=["net"], step_fn=step_fn, batches=batches, record=self.record, validate=self.validation(net))

    def result(self, summary: dict[str, Any]) -> dict[str, Any]:
        weights = {src.name: round(src.weight, 4) for src in self.sources}
        return {**super().result(summary), "modalities": self.registry.modalities, "dataset_weights": weights}


def universal_step(cfg: UniversalConfig, registry: TaskRegistry, names: list[str]) -> Any:
    """The step: per part (one dataset's batch, or a mixed batch) the task losses and the modality
    term; several datasets a step (``datasets_per_step``) average their parts."""
    exclusive = cfg.class_loss == "exclusive"
    seg_loss = TaskBCEDiceLoss(num_tasks=registry.null_task + 1, exclusive=exclusive)
    per_dataset_loss = TaskBCEDiceLoss(num_tasks=registry.null_task + 1, exclusive=exclusive)
    unknown = len(registry.modalities) - 1

    def part_loss(net: torch.nn.Module, batch: dict, logged: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        out = net(batch["image"], batch["task_ids"], batch["modality"])
        seg = seg_loss(out["logits"], batch["target"], batch["task_weight"], batch["task_ids"])
        if "modality_logits" in out:
            # "unknown" modalities teach nothing; a batch of only those gives 0 (not 0/0), without a host sync
            known = (batch["modality"] != unknown).float()
            per_sample = F.cross_entropy(out["modality_logits"].float(), batch["modality"], ignore_index=unknown, reduction="none")
            mod = (per_sample * known).sum() / known.sum().clamp_min(1.0)
        else:  # no modality priors (an ablation): nothing to classify
            mod = seg.detach() * 0
        if batch.get("one_dataset") is not None:  # one dataset a part: its loss is the part's
            logged[f"loss/{names[batch['one_dataset']]}"] = seg.detach()
            return seg, mod, seg_loss.last["bce"], seg_loss.last["dice"]
        with torch.no_grad():  # each dataset's share of the loss, so a starving task shows in the log (NaN: not in this batch)
            for d, name in enumerate(names):
                mine = (batch["dataset"] == d).float()
                value = per_dataset_loss(out["logits"], batch["target"], batch["task_weight"] * mine[:, None], batch["task_ids"])
                value = torch.where(mine.sum() > 0, value, torch.full_like(value, float("nan")))
                logged[f"loss/{name}"] = torch.where(value.isnan(), logged[f"loss/{name}"], value)
        return seg, mod, seg_loss.last["bce"], seg_loss.last["dice"]

    def step_fn(models: dict, batch: dict | list[dict]) -> dict[str, torch.Tensor]:
        logged = {f"loss/{name}": torch.tensor(float("nan")) for name in names}  # every rank logs the same keys; NaN: not this step
        parts = [part_loss(models["net"], b, logged) for b in (batch if isinstance(batch, list) else [batch])]
        seg, mod, bce, dice = (torch.stack([p[i] for p in parts]).mean() for i in range(4))
        return {"loss": seg + cfg.modality_weight * mod, "loss/bce": bce, "loss/dice": dice, "loss/modality": mod.detach(), **logged}

    return step_fn


def train_universal(
    datasets: list[str | Path],
    out: str | Path,
    config: str | Path | UniversalConfig | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    splits: dict[str, dict[str, list[str]]] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train one Hermes model on several raw datasets; returns the run summary (``run.json``).

    ``splits`` maps a dataset name to ``{"train": [ids], "val": [ids]}`` (else fold ``fold`` of
    each dataset's own split)."""
    if not datasets:
        raise MedalloyError("no datasets given", fix="give at least one dataset folder")
    dss = [RawDataset(d) for d in datasets]
    cfg = resolve_config(UniversalConfig, config, overrides, progress)
    return run_recipe(UniversalRecipe(cfg, dss, splits, progress), out, resume=resume, overwrite=overwrite, progress=progress)


def load_universal(path: str | Path, device: str = "cpu") -> tuple[HermesNet, TaskRegistry, dict[str, Plan], dict[str, Any]]:
    """Network, task registry, per-dataset plans and record (its ``spec`` of the current version) of a universal checkpoint."""
    tensors, record = ckpt.load_checkpoint(path, method=METHOD, map_location=device)
    spec = read_spec(UniversalSpec, record, path, tensors.keys())
    try:
        registry = TaskRegistry.model_validate(record["registry"])
        plans = {k: Plan.model_validate(v) for k, v in record["plans"].items()}
    except (KeyError, ValidationError, TypeError, ValueError):
        raise MedalloyError("checkpoint record lacks a valid registry or plans", path, "retrain with this medalloy version") from None
    net = build_universal(spec)
    ckpt.load_module_state(net, ckpt.group(tensors, "model/net"), path, "net", "use the checkpoint with its own run")
    return net.eval(), registry, plans, {**record, "spec": spec.to_record()}


register_multitask(METHOD, load_universal)
