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
``datasets_per_step`` datasets' own batches (as the universal model, docs/research/hermes.md). The
checkpoint holds the experts too, so ``medalloy predict RUN --dataset NAME`` (or ``--task T``)
needs nothing else. Run folder as for the universal model (``registry.json``, ``plans/``, ...).
"""

from __future__ import annotations

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
from medalloy.engine import checkpoint as ckpt
from medalloy.engine.trainer import TrainConfig, TrainSpec
from medalloy.errors import MedalloyError
from medalloy.losses import LogitKDLoss, TaskBCEDiceLoss
from medalloy.models.ka2er import KA2ERNet, build_ka2er, choose_taps, probe_stages
from medalloy.models.swin import load_swin_state, load_swin_weights
from medalloy.models.unet import count_parameters
from medalloy.planning.multi_dataset import amalgamation_plans, stride_multiple
from medalloy.planning.plan import Plan
from medalloy.recipes.config import MultiDatasetConfig
from medalloy.recipes.expert import ExpertSpec, build_expert
from medalloy.recipes.multitask import MultiDatasetRecipe, TaskRegistry, build_registry, register_multitask, tasks_in_label_order
from medalloy.recipes.registry import NNUNET, ONNX, load_model, resolve_source
from medalloy.recipes.scaffold import Run, resolve_config, run_recipe, task_entry
from medalloy.recipes.spec import ModelSpec, read_spec, register_spec
from medalloy.runs import resolve_checkpoint
from medalloy.seeding import seed_everything

METHOD = "amalgamate"


class AmalgamateConfig(MultiDatasetConfig):
    """Everything of an amalgamation run besides the datasets and experts (YAML: ``--config CFG.yaml``)."""

    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=2000, val_every=200, lr=5e-4))
    max_2d_side: int = Field(256, ge=32)
    base_filters: int = Field(32, ge=1)  # the planner's (patch and batch rules); the network is the foundation
    max_filters: int = Field(320, ge=1)
    feature_size: int = Field(12, ge=12, description="SwinUNETR width, a multiple of 12 (48 on a GPU: MONAI's pre-trained size)")
    foundation: str = "scratch"  # "scratch", a weights file (.safetensors/.pt/.pth), or a medalloy amalgamate run/checkpoint
    stages: list[Literal["enc3", "enc4", "bottleneck"]] = Field(default_factory=lambda: ["enc4", "bottleneck"])
    width: int = Field(64, ge=8)
    heads: int = Field(4, ge=1)
    hierarchical: bool = True  # False: concatenate + 1x1 conv (the ablation)
    decoder: Literal["prompt", "plain"] = Field("prompt", description="prompt-driven mask decoder, or one 1x1 head per task (plain: the ablation)")
    decoder_depth: int = Field(2, ge=1)
    task_adaptive: bool | None = None  # stage 3's task condition; None: on with the prompt decoder, off with the plain one
    expert_priors: bool = True  # each task's logits = its own experts' log-odds + the decoder's correction
    route: bool = True  # experts sharing a task weighed per image by a router trained to tell their sources apart
    route_weight: float = Field(1.0, ge=0.0)
    kd_logits: float = Field(1.0, ge=0.0)
    kd_temperature: float = Field(2.0, gt=0.0)
    kd_features: float = Field(0.1, ge=0.0)


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
    path = Path(path)
    source = resolve_source(path, which=None)  # each kind's default: a run's best checkpoint, nnU-Net's checkpoint_final.pth
    fix = "give medalloy expert runs or nnU-Net v2 model folders"
    if source.kind == ONNX:
        raise MedalloyError("an exported ONNX graph cannot be an expert here (its stages cannot be tapped)", source.path, fix)
    net, plan, record = load_model(source.path, device)
    if source.kind == NNUNET:
        spec = {"kind": "nnunet", "architecture": record["architecture"], "plan": plan.model_dump(mode="json")}
    else:
        if record.get("method") != "expert":
            raise MedalloyError(f"a '{record.get('method')}' model cannot be an expert here", source.path, fix)
        spec = {"kind": "expert", "plan": plan.model_dump(mode="json")}
    return net.eval(), plan, record, {**spec, "source": str(path), "in_channels": plan.in_channels, "dim": plan.dim}


def rebuild_expert(expert: FrozenExpert) -> nn.Module:
    """An expert's network (random weights) from what the spec keeps of it."""
    if expert.kind == "nnunet":
        from medalloy.interop.nnunet import build_nnunet_network

        return build_nnunet_network(expert.architecture, expert.plan)
    return build_expert(ExpertSpec.of_plan(expert.plan))


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


class AmalgamateRecipe(MultiDatasetRecipe[AmalgamateConfig]):
    """Frozen experts amalgamated into one SwinUNETR model of the tasks of several datasets (KA2ER)."""

    METHOD = METHOD

    def __init__(self, cfg: AmalgamateConfig, dss: list[RawDataset], experts: list[str | Path], splits: dict | None = None, progress: bool = True):
        super().__init__(cfg, dss, splits, progress)
        self.expert_paths = experts

    def check(self) -> None:
        self.check_datasets()
        self.loaded = [load_frozen_expert(e) for e in self.expert_paths]
        for _, plan, _, spec in self.loaded:
            if plan.dim != self.cfg.dim:
                raise MedalloyError(
                    f"a {plan.dim}D expert in a {self.cfg.dim}D amalgamation", spec["source"], f"give {self.cfg.dim}D experts or set dim: {plan.dim}"
                )
        self.registry = build_registry(self.dss, self.cfg.task_names)

    def inputs(self) -> dict[str, Any]:
        return {**super().inputs(), "experts": [spec["source"] for _, _, _, spec in self.loaded]}

    def make_plans(self, owns: dict[str, Plan], values: dict[str, list[int]]) -> dict[str, Plan]:
        multiple = stride_multiple([p for _, p, _, _ in self.loaded], self.cfg.dim)
        return amalgamation_plans(owns, values, multiple, self.cfg.batch_size)

    def _experts(self) -> list[dict[str, Any]]:
        """Each frozen expert as the spec keeps it: its stages tapped at the largest patch of the run."""
        largest = max((p.patch_size for p in self.plans.values()), key=lambda s: int(np.prod(s)))
        experts = []
        for net, plan, record, spec in self.loaded:
            taps, channels = choose_taps(probe_stages(net, plan.in_channels, largest), list(self.cfg.stages))
            experts.append({**spec, "taps": taps, "channels": channels, "dataset": _expert_dataset(record, self.dss), "label_values": list(plan.label_values)})
        return experts

    def _task_experts(self, links: ExpertLinks, experts: list[dict[str, Any]], progress: bool) -> list[list[tuple[int, int]]] | None:
        if not (self.cfg.expert_priors and self.loaded):
            return None
        paired = {k for entry in links.task for k, _ in entry}
        for k, e in enumerate(experts):
            if e["dataset"] is not None and k not in paired and progress:  # e.g. an nnU-Net expert whose labels were renumbered
                values = sorted(self.registry.datasets[e["dataset"]]["labels"].values())
                print(
                    f"warning: expert {e['source']} (of {e['dataset']}) has none of its label values {values} (it has {e['label_values']}): no expert prior from it"
                )
        return links.task

    def train_spec(self, run: Run, split: dict[str, Any]) -> TrainSpec:
        cfg, registry = self.cfg, self.registry
        experts = self._experts()
        links = expert_links(experts, registry)
        self.load_sources(run, split)
        seed_everything(cfg.train.seed)
        spec = AmalgamateSpec.from_config(
            cfg, in_channels=self.in_channels, n_tasks=len(registry.tasks), task_experts=self._task_experts(links, experts, run.progress),
            experts=[FrozenExpert.model_validate(e) for e in experts],
        )  # fmt: skip
        net = build_amalgamated(spec, [e for e, _, _, _ in self.loaded])
        self.foundation_note = init_foundation(net, cfg.foundation) if not run.resume else "resumed"  # every rank: each holds its own copy
        if run.progress:
            print(self.foundation_note)
        batches = MixedSampler(
            self.sources, cfg.batch_size or 1, self.in_channels, registry.null_task, cfg.train.seed, foreground_oversample=0.33, per_dataset=True,
            datasets_per_step=cfg.datasets_per_step,
        )  # fmt: skip
        self.record = {
            "method": METHOD,
            "name": "amalgamate-" + "+".join(ds.name for ds in self.dss),
            "tasks": [task_entry(ds) for ds in self.dss],
            "registry": registry.model_dump(mode="json"),
            "plans": {k: p.model_dump(mode="json") for k, p in self.plans.items()},
            "spec": spec.to_record(),
            "kd_pairs": links.teacher,
            "foundation_init": self.foundation_note,
            "activation": "sigmoid",
            "params": count_parameters(net),
            "trainable_params": sum(p.numel() for p in net.parameters() if p.requires_grad),
        }
        step_fn = amalgamate_step(cfg, registry, self.sources, links)
        return TrainSpec(models={"net": net}, trainable=["net"], step_fn=step_fn, batches=batches, record=self.record, validate=self.validation(net))

    def result(self, summary: dict[str, Any]) -> dict[str, Any]:
        return {**super().result(summary), "trainable_params": self.record["trainable_params"], "foundation_init": self.foundation_note}


def amalgamate_step(cfg: AmalgamateConfig, registry: TaskRegistry, sources: list, links: ExpertLinks) -> Any:
    """The step: per dataset part, the task losses, the logit and feature terms from the dataset's
    own expert and the router's term; several datasets a step average their parts."""
    seg_loss = TaskBCEDiceLoss(num_tasks=registry.null_task + 1, exclusive=cfg.class_loss == "exclusive")
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
        logged[f"loss/{names[d]}"] = seg.detach()
        return seg, kd_logit, kd_feat, route

    def step_fn(models: dict, batch: dict | list[dict]) -> dict[str, torch.Tensor]:
        logged = {f"loss/{name}": torch.tensor(float("nan")) for name in names}  # NaN: not in this step
        parts = [part_loss(models["net"], b, logged) for b in (batch if isinstance(batch, list) else [batch])]
        seg, kd_logit, kd_feat, route = (torch.stack([p[i] for p in parts]).mean() for i in range(4))
        loss = seg + cfg.kd_logits * kd_logit + cfg.kd_features * kd_feat + cfg.route_weight * route
        logged.update({"loss/seg": seg.detach(), "loss/kd_logits": kd_logit.detach(), "loss/kd_features": kd_feat.detach(), "loss/route": route.detach()})
        return {"loss": loss, **logged}

    return step_fn


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
    cfg = resolve_config(AmalgamateConfig, config, overrides, progress)
    return run_recipe(AmalgamateRecipe(cfg, dss, experts, splits, progress), out, resume=resume, overwrite=overwrite, progress=progress)


# -- prediction ------------------------------------------------------------------------------


def load_amalgamated(path: str | Path, device: str = "cpu") -> tuple[KA2ERNet, TaskRegistry, dict[str, Plan], dict[str, Any]]:
    """Network (experts included), task registry, per-dataset plans and record (its ``spec`` of the current version) of a checkpoint."""
    tensors, record = ckpt.load_checkpoint(path, method=METHOD, map_location=device)
    spec = read_spec(AmalgamateSpec, record, path, tensors.keys())
    try:
        registry = TaskRegistry.model_validate(record["registry"])
        plans = {k: Plan.model_validate(v) for k, v in record["plans"].items()}
    except (KeyError, ValidationError, TypeError, ValueError):
        raise MedalloyError("checkpoint record lacks a valid registry or plans", path, "retrain with this medalloy version") from None
    net = build_amalgamated(spec)
    ckpt.load_module_state(net, ckpt.group(tensors, "model/net"), path, "net", "use the checkpoint with its own run")
    return net.eval(), registry, plans, {**record, "spec": spec.to_record()}


register_multitask(METHOD, load_amalgamated)
