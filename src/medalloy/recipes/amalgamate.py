"""Knowledge amalgamation (KA2ER): a SwinUNETR foundation learns all tasks of several datasets
while frozen experts (medalloy expert runs or trained nnU-Net v2 folders) lend it their features
through amalgamation layers; a prompt-driven mask decoder answers per task (docs/methods/amalgamation.md).

``L = L_seg + kd_logits * L_logits + kd_features * L_features + route_weight * L_route``:

- ``L_seg``: per-task BCE + Dice with partial labels, as the universal model (``class_loss``);
- ``L_logits``: on a dataset's own batches, KL from its expert's softmax (temperature T) to the
  model's classes ``[0, z_1 .. z_k]`` (background logit 0, the exclusive form of the task logits),
  when the expert labels exactly the dataset's labels;
- ``L_features``: ``1 - cos`` between the merged tokens of each amalgamated stage and the own
  expert's projected tokens (held fixed), so the own expert's knowledge is what the layer keeps first;
- ``L_route``: cross-entropy of the router (which expert's source an image is from) against the
  expert trained on the batch's dataset, when experts share a task (:mod:`medalloy.models.ka2er`).

With ``expert_priors`` (default) each task's logits start from its own experts' log-odds (see
:mod:`medalloy.models.ka2er`): the decoder learns a correction, and ``L_logits`` keeps it near the expert.

Datasets keep their own plans (spacing, normalisation, patch, batch); patches are rounded up to
the foundation's 32 and every expert's total stride; each optimizer step averages the losses of
``datasets_per_step`` datasets' own batches (as the universal model, docs/methods/hermes.md). The
checkpoint holds the experts too, so ``medalloy predict RUN --dataset NAME`` (or ``--task T``)
needs nothing else. Run folder as for the universal model (``registry.json``, ``plans/``, ...).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from medalloy.data.dataset import RawDataset
from medalloy.data.mixed import MixedSampler
from medalloy.data.transforms import AugmentConfig
from medalloy.engine import checkpoint as ckpt
from medalloy.engine.trainer import TrainConfig, TrainSpec
from medalloy.errors import MedalloyError
from medalloy.losses import LogitKDLoss, TaskBCEDiceLoss
from medalloy.models.ka2er import KA2ERNet, build_ka2er, choose_taps, probe_stages
from medalloy.models.swin import load_swin_state, load_swin_weights
from medalloy.models.unet import build_unet, count_parameters
from medalloy.planning.plan import Plan, load_plan, save_plan
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
    tasks_in_label_order,
    validation_sets,
)
from medalloy.recipes.registry import load_checkpoint_model
from medalloy.recipes.spec import ModelSpec, read_spec, register_spec
from medalloy.recipes.scaffold import Run, dice_validation, open_run, require_labelled, resolve_config, task_entry
from medalloy.runs import resolve_checkpoint
from medalloy.seeding import seed_everything

METHOD = "amalgamate"
TOP_KEYS = ("fold", "batch_size", "dim", "feature_size", "foundation", "decoder", "hierarchical", "stages", "expert_priors", "datasets_per_step")


class AmalgamateConfig(BaseModel):
    """Everything of an amalgamation run besides the datasets and experts (YAML: ``--config CFG.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=2000, val_every=200, lr=5e-4))
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    dim: Literal[2, 3] = 2
    max_2d_side: int = Field(256, ge=32)
    plan_options: dict[str, PlanOptions] = Field(default_factory=dict)
    batch_size: int | None = Field(None, ge=1)  # None: each dataset's plan's
    base_filters: int = Field(32, ge=1)  # the planner's (patch and batch rules); the network is the foundation
    max_filters: int = Field(320, ge=1)
    feature_size: int = Field(12, ge=12)  # SwinUNETR width (multiple of 12); 48 is MONAI's pre-trained size
    foundation: str = "scratch"  # "scratch", a weights file (.safetensors/.pt/.pth), or a medalloy amalgamate run/checkpoint
    stages: list[Literal["enc3", "enc4", "bottleneck"]] = Field(default_factory=lambda: ["enc4", "bottleneck"])
    width: int = Field(64, ge=8)
    heads: int = Field(4, ge=1)
    hierarchical: bool = True  # False: concatenate + 1x1 conv (the ablation)
    decoder: Literal["prompt", "plain"] = "prompt"
    decoder_depth: int = Field(2, ge=1)
    task_adaptive: bool | None = None  # stage 3's task condition; None: on with the prompt decoder, off with the plain one
    expert_priors: bool = True  # each task's logits = its own experts' log-odds + the decoder's correction
    route: bool = True  # experts sharing a task weighed per image by a router trained to tell their sources apart
    route_weight: float = Field(1.0, ge=0.0)
    datasets_per_step: int = Field(2, ge=1)  # own-patch batches of this many datasets averaged per optimizer step
    prior_probability: float | None = Field(0.01, gt=0.0, lt=1.0)
    class_loss: Literal["exclusive", "bce"] = "exclusive"
    kd_logits: float = Field(1.0, ge=0.0)
    kd_temperature: float = Field(2.0, gt=0.0)
    kd_features: float = Field(0.1, ge=0.0)
    dataset_weighting: Literal["sqrt", "size", "uniform"] = "sqrt"
    task_names: dict[str, str] = Field(default_factory=dict)
    fold: int = 0
    folds: int = 5
    max_val_cases: int = Field(8, ge=0)


class FrozenExpert(BaseModel):
    """One frozen expert inside an amalgamated model: how to rebuild it (``kind``, ``plan``, and
    nnU-Net's ``architecture`` for ``nnunet``), where its features are read (``taps``: foundation
    stage -> expert stage, ``channels``: their widths) and what it was trained on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["expert", "nnunet"]
    plan: Plan
    architecture: dict[str, Any] | None = None
    source: str
    in_channels: int = Field(ge=1)
    dim: Literal[2, 3]
    taps: dict[str, str]
    channels: dict[str, int]
    dataset: str | None = None
    label_values: list[int]


class AmalgamateSpec(ModelSpec):
    """A :class:`~medalloy.models.ka2er.KA2ERNet`: a SwinUNETR foundation of ``feature_size``, the
    frozen ``experts`` it amalgamates at ``stages``, and its decoder (options named as in
    :class:`AmalgamateConfig`; ``task_experts``: per task, the ``(expert, class)`` pairs whose
    log-odds start its logits, or None without expert priors)."""

    METHOD: ClassVar[str] = METHOD

    dim: Literal[2, 3]
    in_channels: int = Field(ge=1)
    n_tasks: int = Field(ge=1)
    feature_size: int
    stages: list[str]
    width: int
    heads: int
    hierarchical: bool
    decoder: Literal["prompt", "plain"]
    decoder_depth: int
    task_adaptive: bool | None
    prior_probability: float | None
    route: bool
    task_experts: list[list[tuple[int, int]]] | None = None
    experts: list[FrozenExpert]


def build_amalgamated(spec: AmalgamateSpec, experts: list[nn.Module] | None = None) -> KA2ERNet:
    """The network ``spec`` describes, with the loaded frozen ``experts`` (training) or, without
    them, experts rebuilt from the spec with random weights (loading: the checkpoint holds theirs)."""
    nets = experts if experts is not None else [rebuild_expert(e) for e in spec.experts]
    return build_ka2er(
        spec.dim, spec.in_channels, spec.n_tasks, spec.feature_size, nets, [e.in_channels for e in spec.experts], [e.taps for e in spec.experts],
        [e.channels for e in spec.experts], stages=list(spec.stages), width=spec.width, heads=spec.heads, hierarchical=spec.hierarchical,
        decoder=spec.decoder, decoder_depth=spec.decoder_depth, task_adaptive=spec.task_adaptive, prior_probability=spec.prior_probability,
        task_experts=None if spec.task_experts is None else [[tuple(p) for p in t] for t in spec.task_experts], route=spec.route,
    )  # fmt: skip


def _spec_from_v0(record: dict[str, Any], tensors: Collection[str]) -> dict[str, Any]:
    """Records before specs: the options under ``model``, the experts, dim and channels at the top."""
    model = {"route": False, **record["model"]}  # records before the router have none
    if model.get("decoder") == "plain" and "model/net/task_embed.weight" not in tensors:
        model["task_adaptive"] = False  # records before the switch say true where the plain decoder had no condition
    return {**model, "dim": record["dim"], "in_channels": record["in_channels"], "n_tasks": len(record["registry"]["tasks"]), "experts": record["experts"]}


register_spec(AmalgamateSpec, {0: _spec_from_v0})


# -- experts ---------------------------------------------------------------------------------


def load_frozen_expert(path: str | Path, device: str = "cpu") -> tuple[nn.Module, Plan, dict[str, Any], dict[str, Any]]:
    """A medalloy expert run (or checkpoint) or a trained nnU-Net v2 folder: network, plan,
    record, and the spec a checkpoint keeps to rebuild it."""
    from medalloy.interop.nnunet import is_nnunet_folder

    path = Path(path)
    if is_nnunet_folder(path):
        from medalloy.interop.nnunet import load_nnunet_expert

        net, plan, record = load_nnunet_expert(path, device=device)
        spec = {"kind": "nnunet", "architecture": record["architecture"], "plan": plan.model_dump(mode="json")}
    else:
        checkpoint = resolve_checkpoint(path)
        net, plan, record = load_checkpoint_model(checkpoint, device)
        if record.get("method") != "expert":
            raise MedalloyError(
                f"a '{record.get('method')}' model cannot be an expert here", checkpoint, "give medalloy expert runs or nnU-Net v2 model folders"
            )
        spec = {"kind": "expert", "plan": plan.model_dump(mode="json")}
    return net.eval(), plan, record, {**spec, "source": str(path), "in_channels": plan.in_channels, "dim": plan.dim}


def rebuild_expert(spec: dict[str, Any]) -> nn.Module:
    """An expert's network (random weights) from the spec a checkpoint keeps."""
    if spec["kind"] == "nnunet":
        from medalloy.interop.nnunet import build_nnunet_network

        return build_nnunet_network(spec["architecture"], Plan.model_validate(spec["plan"]))
    plan = Plan.model_validate(spec["plan"])
    return build_unet(plan.network, plan.in_channels, plan.num_classes)


def _expert_dataset(record: dict[str, Any], dss: list[RawDataset]) -> str | None:
    """The run's dataset an expert was trained on (by name or folder), if any."""
    names = {t.get("dataset", "").lower() for t in record.get("tasks", [])} | {t.get("folder", "").lower() for t in record.get("tasks", [])}
    for ds in dss:
        if ds.name.lower() in names or ds.root.name.lower() in names:
            return ds.name
    return None


@dataclass(frozen=True)
class ExpertLinks:
    """How a run's experts relate to its datasets and tasks, read once from each expert's dataset
    and label values: ``teacher`` (dataset -> the first expert labelling exactly its labels, in its
    order: it teaches the dataset's logits), ``own`` (dataset -> the first expert trained on it: the
    router's target) and ``task`` (per registry task, ``[(expert, class channel)]`` of every expert
    whose dataset labels it and whose label values hold that label: its expert priors)."""

    teacher: dict[str, int]
    own: dict[str, int]
    task: list[list[tuple[int, int]]]


def expert_links(experts: list[dict[str, Any]], registry: TaskRegistry) -> ExpertLinks:
    """The :class:`ExpertLinks` of ``experts`` (``{"dataset": name | None, "label_values": [...]}``)."""
    teacher: dict[str, int] = {}
    own: dict[str, int] = {}
    task: list[list[tuple[int, int]]] = [[] for _ in registry.tasks]
    for k, e in enumerate(experts):
        d = e.get("dataset")
        entry = registry.datasets.get(d or "")
        if entry is None:  # trained elsewhere: it teaches features only
            continue
        values = list(e.get("label_values", []))
        own.setdefault(d, k)
        if d not in teacher and values == [0] + [entry["labels"][t] for t in tasks_in_label_order(entry)]:
            teacher[d] = k
        for name, value in entry["labels"].items():
            if value in values[1:]:
                task[registry.tasks.index(name)].append((k, values.index(value)))
    return ExpertLinks(teacher, own, task)


def stride_multiple(plans: list[Plan], dim: int) -> list[int]:
    """Per axis, what every patch must be a multiple of: 32 (the foundation) and each expert's total stride."""
    out = [32] * dim
    for p in plans:
        out = [math.lcm(a, b) for a, b in zip(out, p.network.total_stride())]
    return out


# -- foundation ------------------------------------------------------------------------------


def init_foundation(net: KA2ERNet, source: str) -> str:
    """Initialise the foundation (scratch, a weights file, or a medalloy amalgamate run's); one-line report."""
    if source == "scratch":
        return "foundation from scratch"
    path = Path(source)
    is_run = path.is_dir() or (path.suffix == ".safetensors" and _has_record(path))
    if not is_run:
        return str(load_swin_weights(net.foundation, path))
    checkpoint = resolve_checkpoint(path)
    tensors, record = ckpt.load_checkpoint(checkpoint, method=METHOD)
    state = {k[len("foundation.") :]: v for k, v in ckpt.group(tensors, "model/net").items() if k.startswith("foundation.")}
    if not state:
        raise MedalloyError("checkpoint holds no foundation weights", checkpoint, "give an amalgamate run or a SwinUNETR weights file")
    return str(load_swin_state(net.foundation, state, checkpoint))


def _has_record(path: Path) -> bool:
    try:
        ckpt.read_record(path)
        return True
    except MedalloyError:
        return False


# -- training --------------------------------------------------------------------------------


def _plans(run: Run, dss: list[RawDataset], cfg: AmalgamateConfig, registry: TaskRegistry, multiple: list[int]) -> dict[str, Plan]:
    saved = {ds.name: run.kept(f"plans/{ds.name}.json") for ds in dss}
    if all(saved.values()):
        plans = {name: load_plan(path) for name, path in saved.items()}
    else:
        plans = {}
        for ds in dss:
            own = own_plan(ds, cfg)
            patch = [int(-(-p // m) * m) for p, m in zip(own.patch_size, multiple)]
            batch = cfg.batch_size or own.batch_size
            note = f"amalgamation: patch {'x'.join(map(str, patch))} (own {'x'.join(map(str, own.patch_size))}, rounded to multiples of {'x'.join(map(str, multiple))}), batch {batch}"
            plans[ds.name] = dataset_plan(own, patch, own.network, batch, registry.datasets[ds.name], note)
    for name, p in plans.items():
        save_plan(p, run.out / "plans" / f"{name}.json")
    return plans


def _model_options(cfg: AmalgamateConfig) -> dict[str, Any]:
    return {
        "feature_size": cfg.feature_size, "stages": list(cfg.stages), "width": cfg.width, "heads": cfg.heads, "hierarchical": cfg.hierarchical,
        "decoder": cfg.decoder, "decoder_depth": cfg.decoder_depth, "task_adaptive": cfg.task_adaptive, "prior_probability": cfg.prior_probability,
        "route": cfg.route,
    }  # fmt: skip


def _build(model: dict[str, Any], dim: int, in_channels: int, n_tasks: int, experts: list[nn.Module], specs: list[dict[str, Any]]) -> KA2ERNet:
    opts = dict(model)
    feature_size = int(opts.pop("feature_size"))
    return build_ka2er(
        dim,
        in_channels,
        n_tasks,
        feature_size,
        experts,
        [int(s["in_channels"]) for s in specs],
        [s["taps"] for s in specs],
        [s["channels"] for s in specs],
        **opts,
    )


def train_amalgamate(
    datasets: list[str | Path],
    experts: list[str | Path],
    out: str | Path,
    config: str | Path | AmalgamateConfig | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    splits: dict[str, dict[str, list[str]]] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Amalgamate ``experts`` into one model of the tasks of ``datasets``; returns the run summary."""
    if not datasets:
        raise MedalloyError("no datasets given", fix="give at least one dataset folder")
    dss = [RawDataset(d) for d in datasets]
    cfg = resolve_config(AmalgamateConfig, config, overrides, progress, TOP_KEYS)
    for ds in dss:
        require_labelled(ds)
    check_plan_options(cfg, dss)
    loaded = [load_frozen_expert(e) for e in experts]
    for _, plan, _, spec in loaded:
        if plan.dim != cfg.dim:
            raise MedalloyError(f"a {plan.dim}D expert in a {cfg.dim}D amalgamation", spec["source"], f"give {cfg.dim}D experts or set dim: {plan.dim}")
    registry = build_registry(dss, cfg.task_names)
    run = open_run(out, cfg.train, overwrite=overwrite, resume=resume, progress=progress)
    if run.kept(REGISTRY_FILE):
        dss = run.main(lambda: resumed_order(run, dss, cfg.task_names))
        registry = build_registry(dss, cfg.task_names)
    run.write_json(REGISTRY_FILE, registry.model_dump(mode="json"))
    multiple = stride_multiple([p for _, p, _, _ in loaded], cfg.dim)
    plans = run.main(lambda: _plans(run, dss, cfg, registry, multiple))
    in_channels = common_in_channels(plans)
    run.write_config(cfg)
    ids = run.main(lambda: dataset_splits(run, dss, cfg, splits))
    run.write_json("split.json", {"fold": cfg.fold, "datasets": ids})
    run.status(METHOD, datasets=[str(d.root) for d in dss], experts=[str(e) for e in experts])

    largest = max((p.patch_size for p in plans.values()), key=lambda s: int(np.prod(s)))
    specs = []
    for net, plan, record, spec in loaded:
        taps, channels = choose_taps(probe_stages(net, plan.in_channels, largest), list(cfg.stages))
        specs.append({**spec, "taps": taps, "channels": channels, "dataset": _expert_dataset(record, dss), "label_values": list(plan.label_values)})
    links = expert_links(specs, registry)

    seed = cfg.train.seed
    sources, val_cases, sizes = dataset_sources(run, dss, plans, registry, ids, cfg)

    seed_everything(seed)
    model = _model_options(cfg)
    if cfg.expert_priors and loaded:
        model["task_experts"] = links.task
        paired = {k for entry in model["task_experts"] for k, _ in entry}
        for k, sp in enumerate(specs):
            if sp["dataset"] is not None and k not in paired and run.progress:  # e.g. an nnU-Net expert whose labels were renumbered
                values = sorted(registry.datasets[sp["dataset"]]["labels"].values())
                print(f"warning: expert {sp['source']} (of {sp['dataset']}) has none of its label values {values} (it has {sp['label_values']}): no expert prior from it")
    net = _build(model, cfg.dim, in_channels, len(registry.tasks), [e for e, _, _, _ in loaded], specs)
    foundation_note = init_foundation(net, cfg.foundation) if not run.resume else "resumed"  # every rank: each holds its own copy
    if run.progress:
        print(foundation_note)
    batches = MixedSampler(sources, cfg.batch_size or 1, in_channels, registry.null_task, seed, foreground_oversample=0.33, per_dataset=True, datasets_per_step=cfg.datasets_per_step)
    exclusive = cfg.class_loss == "exclusive"
    seg_loss = TaskBCEDiceLoss(num_tasks=registry.null_task + 1, exclusive=exclusive)
    kd = LogitKDLoss(cfg.kd_temperature)
    names = [s.name for s in sources]
    teacher_of = [links.teacher.get(n) for n in names]
    own_expert = [links.own.get(n) for n in names]  # the router's target
    n_tasks_of = [len(s.task_ids) for s in sources]  # the batch's task slots beyond these are padding

    def part_loss(net: nn.Module, batch: dict, logged: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        out = net(batch["image"], batch["task_ids"], batch["modality"])
        seg = seg_loss(out["logits"], batch["target"], batch["task_weight"], batch["task_ids"])
        zero = seg.detach() * 0
        kd_logit, kd_feat = zero, zero
        d = batch["one_dataset"]  # a part holds one dataset
        k = teacher_of[d]
        if k is not None and cfg.kd_logits > 0:
            z = out["logits"][:, : n_tasks_of[d]]
            student = torch.cat([torch.zeros_like(z[:, :1]), z], dim=1)  # classes [0, tasks in label order]
            kd_logit = kd(student, out["expert_logits"][k])
        if k is not None and cfg.kd_features > 0 and out["merged"]:
            terms = [1 - F.cosine_similarity(out["merged"][s].float(), out["expert_tokens"][s][k].detach().float(), dim=-1).mean() for s in out["merged"]]
            kd_feat = torch.stack(terms).mean()
        route = zero
        if out.get("route_logits") is not None and own_expert[d] is not None:
            target = torch.full((out["route_logits"].shape[0],), own_expert[d], dtype=torch.long, device=out["route_logits"].device)
            route = F.cross_entropy(out["route_logits"].float(), target)
        logged[f"seg/{names[d]}"] = seg.detach()
        return seg, kd_logit, kd_feat, route

    def step_fn(models: dict, batch: dict | list[dict]) -> dict[str, torch.Tensor]:
        logged = {f"seg/{name}": torch.tensor(float("nan")) for name in names}  # NaN: not in this step
        parts = [part_loss(models["net"], b, logged) for b in (batch if isinstance(batch, list) else [batch])]
        seg, kd_logit, kd_feat, route = (torch.stack([p[i] for p in parts]).mean() for i in range(4))
        loss = seg + cfg.kd_logits * kd_logit + cfg.kd_features * kd_feat + cfg.route_weight * route
        logged.update({"loss/seg": seg.detach(), "loss/kd_logits": kd_logit.detach(), "loss/kd_features": kd_feat.detach(), "loss/route": route.detach()})
        return {"loss": loss, **logged}

    trainable = [p for p in net.parameters() if p.requires_grad]
    record = {
        "method": METHOD,
        "name": "amalgamate-" + "+".join(ds.name for ds in dss),
        "tasks": [task_entry(ds) for ds in dss],
        "registry": registry.model_dump(mode="json"),
        "plans": {k: p.model_dump(mode="json") for k, p in plans.items()},
        "in_channels": in_channels,
        "dim": cfg.dim,
        "model": model,
        "experts": specs,
        "kd_pairs": links.teacher,
        "foundation_init": foundation_note,
        "activation": "sigmoid",
        "params": count_parameters(net),
        "trainable_params": sum(p.numel() for p in trainable),
    }
    sets = validation_sets(net, registry, plans, val_cases, in_channels, cfg.train.precision)
    spec = TrainSpec(models={"net": net}, trainable=["net"], step_fn=step_fn, batches=batches, record=record, validate=dice_validation(sets) if sets else None)
    summary = run.train(spec, cfg.train)
    result = {
        "method": METHOD,
        "datasets": [str(d.root) for d in dss],
        "experts": [s["source"] for s in specs],
        "name": record["name"],
        "status": "done",
        "fold": cfg.fold,
        "tasks": registry.tasks,
        "train_cases": dict(zip(names, sizes)),
        "val_cases": {k: len(v) for k, v in val_cases.items()},
        "params": record["params"],
        "trainable_params": record["trainable_params"],
        "foundation_init": foundation_note,
        **summary,
    }
    run.write_json("run.json", result)
    return result


# -- prediction ------------------------------------------------------------------------------


def load_amalgamated(path: str | Path, device: str = "cpu") -> tuple[KA2ERNet, TaskRegistry, dict[str, Plan], dict[str, Any]]:
    """Network (experts included), task registry, per-dataset plans and record of a checkpoint."""
    tensors, record = ckpt.load_checkpoint(path, method=METHOD, map_location=device)
    try:
        registry = TaskRegistry.model_validate(record["registry"])
        plans = {k: Plan.model_validate(v) for k, v in record["plans"].items()}
        specs = list(record["experts"])
        model = {"route": False, **record["model"]}  # records before the router have none
        if model.get("decoder") == "plain" and "task_embed.weight" not in ckpt.group(tensors, "model/net"):
            model["task_adaptive"] = False  # records before the switch say true where the plain decoder had no condition
        net = _build(model, int(record["dim"]), int(record["in_channels"]), len(registry.tasks), [rebuild_expert(s) for s in specs], specs)
    except (KeyError, ValidationError, TypeError, ValueError):
        raise MedalloyError("checkpoint record lacks a valid registry, plans, model or experts", path, "retrain with this medalloy version") from None
    ckpt.load_module_state(net, ckpt.group(tensors, "model/net"), path, "net", "use the checkpoint with its own run")
    return net.eval(), registry, plans, record


register_multitask(METHOD, load_amalgamated)
