"""Universal model (Hermes): one 2D or 3D network for the tasks of several datasets, conditioned
on task and modality priors, trained with partial labels.

Tasks and modalities come from the datasets themselves: a task is a label *name* (so "lung" of a
lung+heart dataset and "lung" of a lung-only dataset are one task; ``task_names`` renames), a
modality is ``dataset.json["medalloy"]["modality"]`` (else the first channel name), compared
case-insensitively. Each dataset keeps its own preprocessing plan (spacing, normalisation; in 2D,
3D volumes are sliced along their coarsest axis) and all share one network.

Field of view: by default each dataset keeps its own plan's patch and batch size (whole images
where its expert would use them) and each optimizer step averages the losses of ``datasets_per_step``
distinct datasets' batches (2 by default; docs/methods/hermes.md), drawn by ``dataset_weighting``;
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

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medalloy.data.dataset import RawDataset
from medalloy.data.mixed import MixedSampler
from medalloy.data.transforms import AugmentConfig
from medalloy.engine import checkpoint as ckpt
from medalloy.engine.trainer import TrainConfig, TrainSpec
from medalloy.errors import MedalloyError
from medalloy.losses import TaskBCEDiceLoss
from medalloy.models.hermes import HermesNet, build_hermes
from medalloy.models.unet import count_parameters
from medalloy.planning.plan import NetworkPlan, Plan, load_plan, save_plan
from medalloy.recipes.config import load_recipe_config
from medalloy.recipes.spec import ModelSpec, read_spec, register_spec
from medalloy.recipes.multitask import (
    REGISTRY_FILE,
    PlanOptions,
    TaskRegistry,
    build_registry,
    check_plan_options,
    common_in_channels,
    dataset_plan,
    dataset_sources,
    dataset_splits,
    own_plan,
    register_multitask,
    resumed_order,
    validation_sets,
)
from medalloy.recipes.scaffold import (
    Run,
    dice_validation,
    open_run,
    require_labelled,
    resolve_config,
    task_entry,
)
from medalloy.seeding import seed_everything

METHOD = "universal"
TOP_KEYS = ("fold", "batch_size", "patch_size", "dim", "priors", "datasets_per_step")


MIXED_BATCH = 12


class UniversalConfig(BaseModel):
    """Everything of a universal run besides the datasets (YAML: ``--config CFG.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=2000, val_every=200, lr=2e-3))
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    dim: Literal[2, 3] = 2
    patch_size: int | None = Field(None, ge=16)  # None: each dataset's own plan patch; a side: one shared patch, mixed batches
    max_2d_side: int = Field(256, ge=16)  # per dataset: coarsen the spacing so the median image fits
    plan_options: dict[str, PlanOptions] = Field(default_factory=dict)  # dataset name -> its planner settings
    batch_size: int | None = Field(None, ge=1)  # None: each plan's own (per-dataset batches) or 12 (mixed batches)
    base_filters: int = Field(16, ge=1)
    max_filters: int = Field(256, ge=1)
    priors: Literal["task+modality", "task", "none"] = "task+modality"  # "task", "none": the benchmark's ablations
    fusion_width: int | None = Field(64, ge=8)  # fusion layers at min(channels, width); None: at the backbone's width
    fusion_finest_skipped: int = Field(2, ge=0)  # never at the two finest scales, as the paper
    fusion_scales: int | None = Field(1, ge=1)  # at the bottleneck (measured: docs/methods/hermes.md "Fusion at the bottleneck"; 3: the paper's placement, None: all but the finest)
    fusion_depth: int = Field(1, ge=1)
    tokens_per_modality: int = Field(10, ge=1)
    modality_weight: float = Field(0.01, ge=0.0)
    prior_probability: float | None = Field(0.01, gt=0.0, lt=1.0)  # task logits start at logit(p): "mostly absent" (None: at 0, the paper's)
    task_anchors: bool = True  # a learned vector per task added to its prototype: tasks start apart (docs/methods/hermes.md "Task anchors")
    prior_init_std: float = Field(0.02, gt=0.0)  # task and modality tokens start at N(0, std^2) (1.0 measured worse: docs/methods/hermes.md "What the task head learns")
    fusion_identity_init: bool = True  # fusion layers start as the identity, prototypes as their anchors (docs/methods/hermes.md)
    class_loss: Literal["exclusive", "bce"] = "exclusive"  # a dataset's labels compete (softmax, background logit 0), or the paper's per-task BCE
    dataset_weighting: Literal["sqrt", "size", "uniform"] = "sqrt"
    datasets_per_step: int = Field(2, ge=1)  # per-dataset batches: how many datasets (each at its own patch) one optimizer step averages (docs/methods/hermes.md)
    task_names: dict[str, str] = Field(default_factory=dict)  # "Dataset:label" or "label" -> task name
    fold: int = 0
    folds: int = 5
    max_val_cases: int = Field(8, ge=0)  # per dataset


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


def shared_network(patch: int, base_filters: int, max_filters: int, dim: int = 2) -> tuple[list[int], NetworkPlan]:
    """The planner's U-Net layout for a square (cube) patch at isotropic spacing (rounded up to the poolings)."""
    from medalloy.planning.planner import patch_and_topology

    size, kernels, strides = patch_and_topology(np.array([patch] * dim, float), [1.0] * dim, dim, None)
    filters = [min(base_filters * 2**i, max_filters) for i in range(len(strides))]
    return size, NetworkPlan(kernels=kernels, strides=strides, filters=filters)


def network_of(plans: dict[str, Plan]) -> tuple[str, NetworkPlan]:
    """The shared network: the topology of the plan with the most stages (then the largest patch)."""
    name = max(plans, key=lambda n: (len(plans[n].network.strides), int(np.prod(plans[n].patch_size))))
    return name, plans[name].network


def fit_patch(patch: list[int], network: NetworkPlan) -> list[int]:
    """``patch`` rounded up, per axis, to a multiple of the network's total stride."""
    return [int(-(-p // t) * t) for p, t in zip(patch, network.total_stride())]


def load_config(path: str | Path | None, **overrides: Any) -> UniversalConfig:
    """YAML config (if any) with CLI overrides (``steps``, ``lr``, ... go to ``train``)."""
    return load_recipe_config(UniversalConfig, path, TOP_KEYS, overrides)


def _plans(run: Run, dss: list[RawDataset], cfg: UniversalConfig, registry: TaskRegistry) -> dict[str, Plan]:
    """Rank 0: each dataset's plan (a resumed run's own from ``plans/``), saved there."""
    saved = {ds.name: run.kept(f"plans/{ds.name}.json") for ds in dss}
    if all(saved.values()):
        plans = {name: load_plan(path) for name, path in saved.items()}
    else:
        owns = {ds.name: own_plan(ds, cfg) for ds in dss}
        plans = {}
        if cfg.patch_size is not None:
            patch, network = shared_network(cfg.patch_size, cfg.base_filters, cfg.max_filters, cfg.dim)
            batch = cfg.batch_size or MIXED_BATCH
            for name, own in owns.items():
                note = f"universal model: shared patch {'x'.join(map(str, patch))}, batch {batch}, mixed-dataset batches"
                plans[name] = dataset_plan(own, patch, network, batch, registry.datasets[name], note)
        else:
            source, network = network_of(owns)
            for name, own in owns.items():
                patch, batch = fit_patch(own.patch_size, network), cfg.batch_size or own.batch_size
                padded = "" if patch == own.patch_size else f" (own {'x'.join(map(str, own.patch_size))}, padded to the network's poolings)"
                note = f"universal model: network of {source}'s plan ({len(network.strides)} stages), patch {'x'.join(map(str, patch))}{padded}, batch {batch}, {cfg.datasets_per_step} dataset(s) a step"
                plans[name] = dataset_plan(own, patch, network, batch, registry.datasets[name], note)
    common_in_channels(plans)
    for name, p in plans.items():
        save_plan(p, run.out / "plans" / f"{name}.json")
    return plans


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
    cfg = resolve_config(UniversalConfig, config, overrides, progress, TOP_KEYS)
    for ds in dss:
        require_labelled(ds)
    check_plan_options(cfg, dss)
    registry = build_registry(dss, cfg.task_names)
    run = open_run(out, cfg.train, overwrite=overwrite, resume=resume, progress=progress)
    if run.kept(REGISTRY_FILE):
        dss = run.main(lambda: resumed_order(run, dss, cfg.task_names))
        registry = build_registry(dss, cfg.task_names)
    run.write_json(REGISTRY_FILE, registry.model_dump(mode="json"))
    plans = run.main(lambda: _plans(run, dss, cfg, registry))
    in_channels = common_in_channels(plans)
    network = plans[dss[0].name].network
    run.write_config(cfg)
    ids = run.main(lambda: dataset_splits(run, dss, cfg, splits))
    run.write_json("split.json", {"fold": cfg.fold, "datasets": ids})
    run.status(METHOD, datasets=[str(d.root) for d in dss])

    seed = cfg.train.seed
    sources, val_cases, sizes = dataset_sources(run, dss, plans, registry, ids, cfg)

    seed_everything(seed)
    model = {
        "fusion_depth": cfg.fusion_depth, "tokens_per_modality": cfg.tokens_per_modality, "fusion_width": cfg.fusion_width,
        "priors": cfg.priors, "finest_skipped": cfg.fusion_finest_skipped, "prior_probability": cfg.prior_probability,
        "fusion_scales": cfg.fusion_scales, "task_anchors": cfg.task_anchors, "identity_init": cfg.fusion_identity_init,
        "prior_init_std": cfg.prior_init_std,
    }  # fmt: skip
    net = _build(network, registry, in_channels, model)
    batches = MixedSampler(
        sources, cfg.batch_size or MIXED_BATCH, in_channels, registry.null_task, seed, foreground_oversample=0.33, per_dataset=cfg.patch_size is None,
        datasets_per_step=cfg.datasets_per_step if cfg.patch_size is None else 1,
    )
    exclusive = cfg.class_loss == "exclusive"
    seg_loss = TaskBCEDiceLoss(num_tasks=registry.null_task + 1, exclusive=exclusive)
    per_dataset_loss = TaskBCEDiceLoss(num_tasks=registry.null_task + 1, exclusive=exclusive)
    unknown = len(registry.modalities) - 1
    names = [src.name for src in sources]

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
        # several datasets a step (datasets_per_step): their losses averaged, one optimizer step
        logged = {f"loss/{name}": torch.tensor(float("nan")) for name in names}  # every rank logs the same keys; NaN: not this step
        parts = [part_loss(models["net"], b, logged) for b in (batch if isinstance(batch, list) else [batch])]
        seg, mod, bce, dice = (torch.stack([p[i] for p in parts]).mean() for i in range(4))
        return {"loss": seg + cfg.modality_weight * mod, "bce": bce, "tversky": dice, "modality_ce": mod.detach(), **logged}

    record = {
        "method": METHOD,
        "name": "universal-" + "+".join(ds.name for ds in dss),
        "tasks": [task_entry(ds) for ds in dss],
        "registry": registry.model_dump(mode="json"),
        "plans": {k: p.model_dump(mode="json") for k, p in plans.items()},
        "in_channels": in_channels,
        "network": network.model_dump(mode="json"),
        "model": model,
        "activation": "sigmoid",
        "params": count_parameters(net),
    }
    sets = validation_sets(net, registry, plans, val_cases, in_channels, cfg.train.precision)
    spec = TrainSpec(models={"net": net}, trainable=["net"], step_fn=step_fn, batches=batches, record=record, validate=dice_validation(sets) if sets else None)
    summary = run.train(spec, cfg.train)
    result = {
        "method": METHOD,
        "datasets": [str(d.root) for d in dss],
        "name": record["name"],
        "status": "done",
        "fold": cfg.fold,
        "tasks": registry.tasks,
        "modalities": registry.modalities,
        "train_cases": dict(zip([d.name for d in dss], sizes)),
        "dataset_weights": {src.name: round(src.weight, 4) for src in sources},
        "val_cases": {k: len(v) for k, v in val_cases.items()},
        "params": record["params"],
        **summary,
    }
    run.write_json("run.json", result)
    return result


def _build(network: NetworkPlan, registry: TaskRegistry, in_channels: int, model: dict[str, Any]) -> HermesNet:
    """The network a run's ``record["model"]`` describes (records before fusion_width: full width, fusion from 1/4;
    before fusion_scales: every scale but the finest skipped; before task_anchors: none)."""
    return build_hermes(
        network, len(registry.tasks), len(registry.modalities), in_channels=in_channels,
        depth=int(model.get("fusion_depth", 1)), tokens_per_modality=int(model.get("tokens_per_modality", 10)),
        fusion_width=model.get("fusion_width"), priors=str(model.get("priors", "task+modality")), finest_skipped=int(model.get("finest_skipped", 2)),
        prior_probability=model.get("prior_probability"), fusion_scales=model.get("fusion_scales"),
        task_anchors=bool(model.get("task_anchors", False)), identity_init=bool(model.get("identity_init", False)),
        prior_init_std=float(model.get("prior_init_std", 0.02)),
    )  # fmt: skip


def load_universal(path: str | Path, device: str = "cpu") -> tuple[HermesNet, TaskRegistry, dict[str, Plan], dict[str, Any]]:
    """Network, task registry, per-dataset plans and record of a universal checkpoint."""
    tensors, record = ckpt.load_checkpoint(path, method=METHOD, map_location=device)
    try:
        registry = TaskRegistry.model_validate(record["registry"])
        plans = {k: Plan.model_validate(v) for k, v in record["plans"].items()}
        network = NetworkPlan.model_validate(record["network"])
        in_channels = int(record["in_channels"])
        extra = record.get("model", {})
    except (KeyError, ValidationError, TypeError, ValueError):
        raise MedalloyError("checkpoint record lacks a valid registry, plans or network", path, "retrain with this medalloy version") from None
    net = _build(network, registry, in_channels, extra)
    ckpt.load_module_state(net, ckpt.group(tensors, "model/net"), path, "net", "use the checkpoint with its own run")
    return net.eval(), registry, plans, record


register_multitask(METHOD, load_universal)
