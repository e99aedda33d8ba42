"""Relation-based distillation (Loussaief et al. 2024): a lightweight student learns a frozen
teacher's outputs and feature relations (docs/methods/distillation.md).

``L = L_seg + l_logits L_logits + l_kernel L_kernel + l_affinity L_affinity`` (``losses="relation"``),
or ``relation_cross`` (the same plus ``l_cross L_cross``, the affinity over the positions of the whole batch, relations
across images: losses/affinity.py ``scope="batch"``), or one of the baselines in the same code: ``student_alone`` (L_seg), ``logit_kd``, ``skd``
(logits + pairwise affinity without weighting), ``cwd`` (channel-wise distillation of the logits),
``relation_no_kernel``, ``relation_no_affinity``.

The teacher is any medalloy model (expert, universal bound to the dataset, ...), frozen in eval
mode; its features come through ``FeatureTap`` at ``stages`` of the plan's U-Net, which the
student shares (same plan, same stage names and resolutions). The student keeps the teacher's plan
(preprocessing, patch) and activation (softmax, or one sigmoid per task for a universal teacher).

Run folder as for experts (``plan.json``, ``config.yaml``, ``split.json``, ``metrics.jsonl``,
``checkpoints/``); the checkpoints hold the student and its feature adapters, not the teacher.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from medalloy.data.dataset import RawDataset
from medalloy.data.mixed import dataset_weights, sample_count
from medalloy.data.sampling import PatchSampler
from medalloy.data.transforms import AugmentConfig
from medalloy.engine import checkpoint as ckpt
from medalloy.engine.inference import Predictor
from medalloy.engine.trainer import TrainConfig, TrainSpec
from medalloy.errors import MedalloyError
from medalloy.losses import ChannelWiseLoss, DiceCELoss, KernelMMDLoss, LogitKDLoss, MarginalDiceCELoss, SpatialAffinityLoss, TaskBCEDiceLoss
from medalloy.models.features import STAGES_ATTR, FeatureTap
from medalloy.models.students import UPSAMPLE, student_model
from medalloy.models.unet import count_parameters
from medalloy.planning.plan import NetworkPlan, Plan, save_plan
from medalloy.recipes.registry import load_checkpoint_model, register
from medalloy.recipes.spec import ModelSpec, read_spec, register_spec
from medalloy.recipes.scaffold import (
    ValidationSet,
    cache_cases,
    cases_of,
    dice_validation,
    open_run,
    require_labelled,
    resolve_config,
    select_cases,
    task_entry,
)
from medalloy.recipes.students import build_student, default_stem
from medalloy.runs import resolve_checkpoint
from medalloy.seeding import seed_everything, step_rng

METHOD = "distill"
TOP_KEYS = ("fold", "batch_size", "losses", "student", "separable", "stem", "upsample", "augment")
# which terms each setting trains with (besides L_seg)
LOSS_SETS: dict[str, tuple[str, ...]] = {
    "relation": ("logits", "kernel", "affinity"),
    "relation_cross": ("logits", "kernel", "affinity", "cross"),
    "relation_no_kernel": ("logits", "affinity"),
    "relation_no_affinity": ("logits", "kernel"),
    "student_alone": (),
    "logit_kd": ("logits",),
    "skd": ("logits", "pairwise"),
    "cwd": ("cwd",),
}


class DistillWeights(BaseModel):
    model_config = ConfigDict(extra="forbid")

    logits: float = Field(1.0, ge=0.0)
    kernel: float = Field(1.0, ge=0.0)
    affinity: float = Field(1.0, ge=0.0)
    cross: float = Field(1.0, ge=0.0)
    cwd: float = Field(1.0, ge=0.0)


class DistillConfig(BaseModel):
    """Everything of a distillation run besides the teacher and the dataset (YAML: ``--config``)."""

    model_config = ConfigDict(extra="forbid")

    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=2000, val_every=200, lr=3e-3))
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    losses: Literal["relation", "relation_cross", "relation_no_kernel", "relation_no_affinity", "student_alone", "logit_kd", "skd", "cwd"] = "relation"
    student: str | int = "tiny"  # tiny (<= 0.35 M parameters), small (<= 1 M), a parameter budget, or a plan JSON giving the filters
    separable: bool = False  # depthwise-separable convolutions (wider filters within the same budget)
    stem: int | None = Field(None, ge=0)  # drop the student's N finest stages (1: start at the first pooling; 2: also fold 2x2 pixels into channels); None: recipes/students.default_stem
    upsample: Literal["interpolate", "shuffle"] = "interpolate"  # a stem student's logits back to full resolution: bilinear, or depth-to-space of K * stride^d channels
    stages: list[str] | None = None  # feature stages of the relation terms; None: the bottleneck and dec1 (dec2 for a stem of 2)
    weights: DistillWeights = Field(default_factory=DistillWeights)
    temperature: float = Field(2.0, gt=0.0)
    kernel: Literal["poly", "rbf"] = "poly"
    max_positions: int = Field(256, ge=4)
    fold: int = 0
    folds: int = 5
    max_val_cases: int = 16
    batch_size: int | None = None
    # a dataset labelling only some of the teacher's classes: "marginal" trains the classes it labels
    # (unlabelled ones merged into background: losses/marginal_dice_ce.py; sigmoid: its tasks' terms
    # only) beside the teacher's terms; "teacher": its steps teach through the teacher alone
    partial_labels: Literal["marginal", "teacher"] = "marginal"


class StudentSpec(ModelSpec):
    """A student (:func:`~medalloy.models.students.student_model`): the teacher plan's U-Net
    ``network`` (kernels, strides) at ``filters`` of its own, ``(B, in_channels, *patch) ->
    (B, out_channels, *patch)``; ``stem`` finest stages dropped, their resolution restored by ``upsample``."""

    METHOD: ClassVar[str] = METHOD

    network: NetworkPlan
    in_channels: int = Field(ge=1)
    filters: list[int]
    out_channels: int = Field(ge=1)
    separable: bool
    stem: int = Field(ge=0)
    upsample: Literal["interpolate", "shuffle"]


def _spec_from_v0(record: dict[str, Any], _tensors: Any) -> dict[str, Any]:
    """Records before specs: the student's numbers under ``student``, its layout in the plan."""
    student, plan = record["student"], record["plan"]
    return {
        "network": plan["network"], "in_channels": plan["in_channels"], "filters": student["filters"], "out_channels": student["out_channels"],
        "separable": bool(student.get("separable")), "stem": int(student.get("stem") or 0), "upsample": student.get("upsample") or "interpolate",
    }  # fmt: skip


register_spec(StudentSpec, {0: _spec_from_v0})


def load_teacher(path: str | Path, dataset: str, device: str = "cpu") -> tuple[nn.Module, Plan, dict[str, Any]]:
    """Any medalloy model, as its recipe loads it for ``dataset`` (a universal one bound to it)."""
    return load_checkpoint_model(resolve_checkpoint(path, "best"), device, dataset)


def _tapped(model: nn.Module) -> nn.Module:
    """The module whose stages FeatureTap reads (a universal model bound to tasks exposes its net's)."""
    return model if hasattr(model, STAGES_ATTR) else getattr(model, "net", model)


def confidence(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """``(B, K, *sp) -> (B, *sp)`` in [0, 1]: one minus the teacher's normalised entropy (softmax),
    or the mean over tasks of one minus each sigmoid's binary entropy (sigmoid)."""
    z = logits.float()
    if activation == "softmax":
        p = torch.softmax(z, 1)
        h = -(p * torch.log_softmax(z, 1)).sum(1) / torch.log(torch.tensor(float(z.shape[1])))
    else:
        q = torch.sigmoid(z)
        h = (-(q * torch.nn.functional.logsigmoid(z) + (1 - q) * torch.nn.functional.logsigmoid(-z)) / torch.log(torch.tensor(2.0))).mean(1)
    return (1 - h).clamp(0, 1)


def _adapters(student: nn.Module, teacher: nn.Module, stages: list[str], plan: Plan) -> nn.ModuleDict:
    """1x1 convolutions from the student's stage widths to the teacher's (for the kernel term)."""
    x = torch.zeros(1, plan.in_channels, *plan.patch_size)
    with torch.no_grad(), FeatureTap(_tapped(teacher), stages) as tt, FeatureTap(student, stages) as ts:
        teacher(x)
        student(x)
    conv = nn.Conv2d if plan.dim == 2 else nn.Conv3d
    return nn.ModuleDict({s: conv(ts.features[s].shape[1], tt.features[s].shape[1], 1) for s in stages})


def _fit_labels(ds: RawDataset, plan: Plan) -> bool:
    """Whether ``ds`` labels every class of the student's ``plan`` (else it is partially labelled:
    see ``DistillConfig.partial_labels``); a label the plan lacks, or has with another value, is a
    one-line error."""
    for name, value in ds.spec.labels.items():
        if plan.labels.get(name) != value:
            where = "lacks it" if name not in plan.labels else f"has it as {plan.labels[name]}"
            raise MedalloyError(f"label '{name}' = {value}, but the teacher's plan {where}", ds.root / "dataset.json", "distil datasets whose labels are the teacher's (names and values)")
    return set(plan.labels) <= set(ds.spec.labels)


class _DatasetSteps:
    """Each step one dataset's batch (drawn by ``weights`` from ``(seed, step, rank)``), with its
    index and whether its labels train the student (``seg_weight``: 1.0 or 0.0)."""

    def __init__(self, samplers: list[PatchSampler], full: list[bool], weights: np.ndarray, seed: int):
        self.samplers, self.full, self.seed, self.p = samplers, full, seed, weights

    def __call__(self, step: int, dist: Any = None) -> dict[str, torch.Tensor]:
        rank = 0 if dist is None else dist.rank
        d = int(step_rng(self.seed, step, rank, "dataset").choice(len(self.samplers), p=self.p)) if len(self.samplers) > 1 else 0
        batch = self.samplers[d].sample(step, rank)
        return {**batch, "dataset": torch.tensor(d), "seg_weight": torch.tensor(1.0 if self.full[d] else 0.0)}


def _splits(run: Any, dss: list[RawDataset], cfg: DistillConfig, split: dict[str, Any] | None) -> dict[str, dict[str, list[str]]]:
    """Rank 0: per dataset, training and validation ids (a resumed run keeps its own). ``split`` is
    ``{"train", "val"}`` for one dataset or ``{name: {"train", "val"}}`` for several."""
    if split is None and run.kept("split.json"):
        saved = run.read_json("split.json")
        return saved.get("datasets") or {dss[0].name: {"train": saved["train"], "val": saved["val"]}}
    given = {dss[0].name: split} if split is not None and "train" in split else (split or {})
    return {ds.name: select_cases(ds, cfg.fold, cfg.folds, cfg.train.seed, cfg.max_val_cases, given.get(ds.name)) for ds in dss}


def train_distill(
    dataset: str | Path | Sequence[str | Path],
    teacher: str | Path,
    out: str | Path,
    config: str | Path | DistillConfig | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    split: dict[str, Any] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Distil ``teacher`` (a run folder or checkpoint) into a student on ``dataset`` (one folder or
    several); returns ``run.json``.

    Several datasets: the student is the teacher as asked for the first (its plan: preprocessing,
    patch, classes), and every dataset's images go through that plan, as they would at prediction.
    The others' labels must be the teacher's (names and values); a dataset labelling only some of
    them (Shenzhen's lung beside JSRT's lung and heart) trains the classes it labels through the
    marginal loss and learns the others from the teacher (``partial_labels: teacher``: from the
    teacher alone). Each step trains on one dataset (sqrt of its 2D images or 3D volumes)."""
    paths = [dataset] if isinstance(dataset, (str, Path)) else list(dataset)
    if not paths:
        raise MedalloyError("no datasets given", fix="give at least one dataset folder")
    dss = [RawDataset(d) for d in paths]
    if len({d.name for d in dss}) != len(dss):
        raise MedalloyError("dataset given twice", dss[0].root, "give each dataset once")
    ds = dss[0]
    if isinstance(overrides.get("augment"), str):  # a preset name: the YAML's own augment fields stay over it
        overrides = {**overrides, "augment": {"preset": overrides["augment"]}}
    cfg = resolve_config(DistillConfig, config, overrides, progress, TOP_KEYS)
    for d in dss:
        require_labelled(d)
    teacher_model, plan, teacher_record = load_teacher(teacher, ds.name)
    full = [_fit_labels(d, plan) for d in dss]
    terms = LOSS_SETS[cfg.losses]
    activation = teacher_record.get("activation", "softmax")
    with torch.no_grad():
        n_out = int(teacher_model.eval()(torch.zeros(1, plan.in_channels, *plan.patch_size)).shape[1])
    seed_everything(cfg.train.seed)
    if cfg.stem is None:  # resolved once, so config.yaml and a resumed run keep the student it chose
        cfg = cfg.model_copy(update={"stem": default_stem(plan)})
    if isinstance(cfg.student, str) and cfg.student.lower().endswith(".json"):  # a resumed run finds it from any folder
        cfg = cfg.model_copy(update={"student": str(Path(cfg.student).resolve())})
    student = build_student(plan, cfg.student, out_channels=n_out, separable=cfg.separable, stem=cfg.stem, upsample=cfg.upsample)
    if cfg.stages is None:  # the finest decoder stage a stem student has, below full resolution
        cfg = cfg.model_copy(update={"stages": ["bottleneck", f"dec{max(1, cfg.stem)}"]})
    unknown = [s for s in cfg.stages if s not in getattr(student, STAGES_ATTR)]
    if unknown:
        raise MedalloyError(f"unknown stage '{unknown[0]}'", fix=f"choose stages from {', '.join(getattr(student, STAGES_ATTR))}")
    teacher_steps = teacher_record.get("total_steps")
    if progress and isinstance(teacher_steps, int) and cfg.train.steps < teacher_steps:
        # polyp, converged teacher: students of half its steps kept 92 % of its Dice, of 4/3 of them 99 % (docs/methods/distillation.md)
        print(f"note: the student trains {cfg.train.steps} steps, its teacher trained {teacher_steps}; a student trained shorter than its teacher may stay below it (--steps {teacher_steps} or more)")
    run = open_run(out, cfg.train, overwrite=overwrite, resume=resume, progress=progress)
    if cfg.batch_size:
        plan = plan.model_copy(update={"batch_size": cfg.batch_size})
    run.main(lambda: save_plan(plan, run.out / "plan.json"))
    run.write_config(cfg)
    ids = run.main(lambda: _splits(run, dss, cfg, split))
    run.write_json("split.json", {"fold": cfg.fold, **ids[ds.name], **({"datasets": ids} if len(dss) > 1 else {})})
    run.status(METHOD, dataset=str(ds.root), datasets=[str(d.root) for d in dss], teacher=str(teacher))

    seed = cfg.train.seed
    samplers, sizes, samples, val_sets = [], [], [], []
    for d, is_full in zip(dss, full):
        train_prep = cache_cases(d, cases_of(d, ids[d.name]["train"]), plan, pad=True, seed=seed, desc=f"{d.name}: caching train", progress=run.progress)
        samplers.append(PatchSampler(train_prep, plan.patch_size, plan.batch_size, plan.dim, seed, plan.foreground_oversample, cfg.augment))
        sizes.append(len(train_prep))
        samples.append(sample_count(train_prep, plan.dim))
        if is_full:  # a partially labelled dataset cannot score the classes it lacks
            val_prep = cache_cases(d, cases_of(d, ids[d.name]["val"]), plan, pad=False, seed=seed, desc=f"{d.name}: caching val", progress=run.progress)
            if val_prep:
                val_sets.append((d.name, val_prep))
    marginal = cfg.partial_labels == "marginal"
    batches = _DatasetSteps(samplers, [f or marginal for f in full], dataset_weights(samples, "sqrt"), seed)

    models: dict[str, nn.Module] = {"student": student, "teacher": teacher_model}
    trainable = ["student"]
    if "kernel" in terms:
        models["adapters"] = _adapters(student, teacher_model, cfg.stages, plan)
        trainable.append("adapters")
    w = cfg.weights
    kd = LogitKDLoss(cfg.temperature, binary=activation == "sigmoid")
    affinity = SpatialAffinityLoss(cfg.max_positions, weighting="confidence")
    pairwise = SpatialAffinityLoss(cfg.max_positions, weighting="none")
    cross = SpatialAffinityLoss(cfg.max_positions, weighting="confidence", scope="batch")
    kernel = KernelMMDLoss(cfg.kernel, cfg.max_positions)
    cwd = ChannelWiseLoss(4.0)
    task_loss = TaskBCEDiceLoss(num_tasks=n_out)
    # per dataset: the classes (label values) it annotates, and its softmax segmentation loss
    annotated = [sorted(v for v in d.spec.labels.values() if v) for d in dss]
    dice_ce = [DiceCELoss() if f else MarginalDiceCELoss(n_out, a) for f, a in zip(full, annotated)] if activation == "softmax" else []
    # sigmoid: a task its annotators left out is not scored
    task_mask = [torch.tensor([float(k + 1 in a) for k in range(n_out)]) for a in annotated]
    feature_terms = {"kernel", "affinity", "pairwise", "cross"} & set(terms)
    feature_weights = {"kernel": w.kernel, "affinity": w.affinity, "pairwise": w.affinity, "cross": w.cross}

    def seg_loss(logits: torch.Tensor, label: torch.Tensor, d: int) -> torch.Tensor:
        if activation == "softmax":
            return dice_ce[d](logits, label)
        target = torch.cat([(label == k + 1).float() for k in range(n_out)], dim=1)
        return task_loss(logits, target, task_mask[d].to(logits.device).expand(logits.shape[0], n_out))

    def step_fn(models: dict, batch: dict) -> dict[str, torch.Tensor]:
        x, label = batch["image"], batch["label"]
        stages = cfg.stages if feature_terms else []
        with torch.no_grad(), FeatureTap(_tapped(models["teacher"]), stages) as tt:
            zt = models["teacher"](x)
        with FeatureTap(models["student"], stages) as ts:
            zs = models["student"](x)
        d = int(batch["dataset"])
        seg = seg_loss(zs, label, d) * batch["seg_weight"]  # 0: a partially labelled dataset taught by the teacher alone
        logged = {"seg": seg.detach()}
        if len(dss) > 1:  # each dataset's own curve; NaN: another dataset's step (every step logs the same keys)
            logged.update({f"seg/{ds_.name}": seg.detach() if i == d else torch.full_like(seg.detach(), float("nan")) for i, ds_ in enumerate(dss)})
        total = seg
        if "logits" in terms:
            logged["logits"] = kd(zs, zt)
            total = total + w.logits * logged["logits"]
        if "cwd" in terms:
            logged["cwd"] = cwd(zs, zt)
            total = total + w.cwd * logged["cwd"]
        if feature_terms:
            conf = confidence(zt, activation)
            for term in sorted(feature_terms):
                if term == "kernel":
                    value = sum(kernel(models["adapters"][s](ts.features[s]), tt.features[s]) for s in stages) / len(stages)
                else:
                    loss = {"affinity": affinity, "pairwise": pairwise, "cross": cross}[term]
                    value = sum(loss(ts.features[s], tt.features[s], conf) for s in stages) / len(stages)
                logged[term] = value
                total = total + feature_weights[term] * value
        logged = {k: v.detach() for k, v in logged.items()}
        return {"loss": total, **{f"loss/{k}": v for k, v in logged.items()}}

    def predictor() -> Predictor:
        return Predictor(student, plan, device=next(student.parameters()).device, precision=cfg.train.precision, activation=activation)

    record = {
        "method": METHOD,
        "name": f"student-{ds.name}",
        "tasks": [task_entry(ds)],
        "datasets": [{"dataset": d.name, "folder": d.root.name, "fully_labelled": f, "annotated": a} for d, f, a in zip(dss, full, annotated)],
        "partial_labels": cfg.partial_labels,
        "plan": plan.model_dump(mode="json"),
        "activation": activation,
        "student": {"filters": list(student.filters), "size": cfg.student, "out_channels": n_out, "separable": cfg.separable, "stem": cfg.stem, "upsample": cfg.upsample},
        "teacher": {"path": str(teacher), "method": teacher_record.get("method"), "name": teacher_record.get("name"), "params": count_parameters(teacher_model), "steps": teacher_steps},
        "losses": cfg.losses,
        "params": count_parameters(student),
    }
    sets = [ValidationSet(predictor, prep, plan, prefix=f"{name}/" if len(dss) > 1 else "") for name, prep in val_sets]
    spec = TrainSpec(
        models=models, trainable=trainable, step_fn=step_fn, batches=batches, record=record, validate=dice_validation(sets) if sets else None,
    )  # fmt: skip
    summary = run.train(spec, cfg.train)
    result = {
        "method": METHOD, "dataset": str(ds.root), "name": record["name"], "status": "done", "losses": cfg.losses,
        "datasets": [str(d.root) for d in dss], "train_cases": dict(zip([d.name for d in dss], sizes)),
        "val_cases": {name: len(prep) for name, prep in val_sets}, "params": record["params"], "teacher_params": record["teacher"]["params"], **summary,
    }  # fmt: skip
    run.write_json("run.json", result)
    return result


def load_student(path: str | Path, device: str = "cpu") -> tuple[nn.Module, Plan, dict[str, Any]]:
    """The student network, plan and record of a distillation checkpoint."""
    tensors, record = ckpt.load_checkpoint(path, method=METHOD, map_location=device)
    try:
        plan = Plan.model_validate(record["plan"])
        student = record["student"]
        filters, out_channels = [int(f) for f in student["filters"]], int(student["out_channels"])
        upsample = str(student.get("upsample") or "interpolate")
        if upsample not in UPSAMPLE:
            raise ValueError(upsample)
    except (KeyError, ValidationError, TypeError, ValueError):
        raise MedalloyError("checkpoint record lacks a valid plan or student", path, "retrain with this medalloy version") from None
    model = student_model(plan.network, plan.in_channels, out_channels, filters, bool(student.get("separable")), int(student.get("stem") or 0), upsample)
    ckpt.load_module_state(model, ckpt.group(tensors, "model/student"), path, "student", "use the checkpoint with its own run")
    return model.eval(), copy.deepcopy(plan), record


register(METHOD, lambda path, device, dataset=None: load_student(path, device))
