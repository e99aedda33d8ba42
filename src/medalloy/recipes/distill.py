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

Run folder as for experts (``plan.json``, ``config.yaml``, ``split.json`` of every dataset,
``metrics.jsonl``, ``checkpoints/``); the checkpoints hold the student and its feature adapters, not
the teacher; their record holds the student's :class:`StudentSpec` (``"spec"``), which
:func:`build_student_net` builds for training and loading alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from medalloy.data.dataset import RawDataset
from medalloy.data.mixed import DatasetSteps, dataset_weights, sample_count
from medalloy.data.sampling import PatchSampler
from medalloy.engine import checkpoint as ckpt
from medalloy.engine.inference import Predictor
from medalloy.engine.trainer import TrainConfig, TrainSpec
from medalloy.errors import MedalloyError
from medalloy.losses import ChannelWiseLoss, DiceCELoss, KernelMMDLoss, LogitKDLoss, MarginalDiceCELoss, SpatialAffinityLoss, TaskBCEDiceLoss
from medalloy.models.features import STAGES_ATTR, FeatureTap
from medalloy.models.students import student_model
from medalloy.models.unet import count_parameters
from medalloy.planning.input_fit import dataset_geometry, misfit
from medalloy.planning.plan import NetworkPlan, Plan, save_plan
from medalloy.recipes.config import SegmentationConfig
from medalloy.recipes.registry import load_checkpoint_model, register
from medalloy.recipes.scaffold import (
    Recipe,
    Run,
    ValidationSet,
    cache_cases,
    cases_of,
    dataset_splits,
    dice_validation,
    require_labelled,
    resolve_config,
    run_recipe,
    split_record,
    task_entry,
)
from medalloy.recipes.spec import ModelSpec, read_spec, register_spec
from medalloy.recipes.students import build_student, default_stem
from medalloy.runs import resolve_checkpoint
from medalloy.seeding import seed_everything

METHOD = "distill"
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


class DistillConfig(SegmentationConfig):
    """Everything of a distillation run besides the teacher and the dataset (YAML: ``--config``)."""

    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=2000, val_every=200, lr=3e-3))
    losses: Literal["relation", "relation_cross", "relation_no_kernel", "relation_no_affinity", "student_alone", "logit_kd", "skd", "cwd"] = Field(
        "relation", description="the terms the student learns from the teacher (LOSS_SETS): relation-based KD, its ablations, or a baseline"
    )
    student: str | int = Field(
        "tiny", description="tiny (<= 0.35 M parameters), small (<= 1 M), a parameter count, or PLAN.json (its filters; the teacher plan's kernels and strides)"
    )
    separable: bool = False  # depthwise-separable convolutions (wider filters within the same budget)
    # drop the student's N finest stages (1: start at the first pooling; 2: also fold 2x2 pixels into channels); None: recipes/students.default_stem
    stem: int | None = Field(None, ge=0)
    upsample: Literal["interpolate", "shuffle"] = Field(
        "interpolate", description="a stem student's logits back to full resolution: interpolated, or depth-to-space of K x stride^d channels (shuffle)"
    )
    stages: list[str] | None = None  # feature stages of the relation terms; None: the bottleneck and dec1 (dec2 for a stem of 2)
    weights: DistillWeights = Field(default_factory=DistillWeights)
    temperature: float = Field(2.0, gt=0.0)
    kernel: Literal["poly", "rbf"] = "poly"
    max_positions: int = Field(256, ge=4)
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


def build_student_net(spec: StudentSpec) -> nn.Module:
    """The student ``spec`` describes (random weights): for training and for loading alike."""
    return student_model(spec.network, spec.in_channels, spec.out_channels, spec.filters, spec.separable, spec.stem, spec.upsample)


def choose_student(plan: Plan, cfg: DistillConfig, out_channels: int) -> tuple[StudentSpec, nn.Module]:
    """The student ``cfg`` asks for (its ``stem`` resolved) on the teacher's ``plan``: its spec, and
    :func:`build_student_net` of it, ``(B, in_channels, *patch) -> (B, out_channels, *patch)``.

    The size's choice (:func:`~medalloy.recipes.students.build_student`: a plan JSON's filters, else the
    widest within the budget) builds candidates from torch's generator; the network keeps the chosen
    candidate's weights, so a seed gives the student (and every later draw) it gave before specs."""
    chosen = build_student(plan, cfg.student, out_channels=out_channels, separable=cfg.separable, stem=cfg.stem or 0, upsample=cfg.upsample)
    spec = StudentSpec.from_config(cfg, network=plan.network, in_channels=plan.in_channels, filters=list(chosen.filters), out_channels=out_channels)
    with torch.random.fork_rng(devices=[]):  # building it again draws nothing
        student = build_student_net(spec)
    student.load_state_dict(chosen.state_dict())
    return spec, student


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


class StageAdapters(nn.ModuleDict):
    """One 1x1 convolution per tapped stage; ``forward({stage: features})`` maps them all in one call,
    so under DistributedDataParallel (which wraps modules by their forward, once a step) every
    adapter's gradient is reduced."""

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {s: self[s](f) for s, f in features.items()}


def _adapters(student: nn.Module, teacher: nn.Module, stages: list[str], plan: Plan) -> StageAdapters:
    """1x1 convolutions from the student's stage widths to the teacher's (for the kernel term)."""
    x = torch.zeros(1, plan.in_channels, *plan.patch_size)
    with torch.no_grad(), FeatureTap(_tapped(teacher), stages) as tt, FeatureTap(student, stages) as ts:
        teacher(x)
        student(x)
    conv = nn.Conv2d if plan.dim == 2 else nn.Conv3d
    return StageAdapters({s: conv(ts.features[s].shape[1], tt.features[s].shape[1], 1) for s in stages})


def _fit_labels(ds: RawDataset, plan: Plan) -> bool:
    """Whether ``ds`` labels every class of the student's ``plan`` (else it is partially labelled:
    see ``DistillConfig.partial_labels``); a label the plan lacks, or has with another value, is a
    one-line error."""
    for name, value in ds.spec.labels.items():
        if plan.labels.get(name) != value:
            where = "lacks it" if name not in plan.labels else f"has it as {plan.labels[name]}"
            fix = "distil datasets whose labels are the teacher's (names and values)"
            raise MedalloyError(f"label '{name}' = {value}, but the teacher's plan {where}", ds.root / "dataset.json", fix)
    return set(plan.labels) <= set(ds.spec.labels)


def _datasets(dataset: str | Path | Sequence[str | Path]) -> list[RawDataset]:
    """The datasets given (one folder or several), each once."""
    paths = [dataset] if isinstance(dataset, (str, Path)) else list(dataset)
    if not paths:
        raise MedalloyError("no datasets given", fix="give at least one dataset folder")
    dss = [RawDataset(d) for d in paths]
    if len({d.name for d in dss}) != len(dss):
        raise MedalloyError("dataset given twice", dss[0].root, "give each dataset once")
    return dss


class DistillRecipe(Recipe[DistillConfig]):
    """A student of a frozen teacher on one dataset or several: the teacher's plan and activation, one
    dataset a step, the configured terms (``LOSS_SETS``) beside the segmentation loss."""

    METHOD = METHOD

    def __init__(self, cfg: DistillConfig, dss: list[RawDataset], teacher: str | Path, split: dict[str, Any] | None = None, progress: bool = True):
        super().__init__(cfg, progress)
        self.dss, self.teacher, self.given_split = dss, teacher, split

    def check(self) -> None:
        for d in self.dss:
            require_labelled(d)
        self.teacher_model, self.plan, self.teacher_record = load_teacher(self.teacher, self.dss[0].name)
        self.full = [_fit_labels(d, self.plan) for d in self.dss]
        self.terms = LOSS_SETS[self.cfg.losses]
        self.activation = self.teacher_record.get("activation", "softmax")
        with torch.no_grad():
            self.n_out = int(self.teacher_model.eval()(torch.zeros(1, self.plan.in_channels, *self.plan.patch_size)).shape[1])
        self._choose_student()
        teacher_steps = self.teacher_record.get("total_steps")
        if self.progress and isinstance(teacher_steps, int) and self.cfg.train.steps < teacher_steps:
            # polyp, converged teacher: students of half its steps kept 92 % of its Dice, of 4/3 of them 99 % (docs/methods/distillation.md)
            print(
                f"note: the student trains {self.cfg.train.steps} steps, its teacher trained {teacher_steps}; "
                f"a student trained shorter than its teacher may stay below it (--steps {teacher_steps} or more)"
            )

    def _choose_student(self) -> None:
        """The seeded student, built before the run folder is touched (its stages are checked); the stem,
        student plan path and stages the config leaves open are resolved once, so config.yaml and a
        resumed run keep the student it chose."""
        cfg, plan = self.cfg, self.plan
        seed_everything(cfg.train.seed)
        if cfg.stem is None:
            cfg = cfg.model_copy(update={"stem": default_stem(plan)})
        if isinstance(cfg.student, str) and cfg.student.lower().endswith(".json"):  # a resumed run finds it from any folder
            cfg = cfg.model_copy(update={"student": str(Path(cfg.student).resolve())})
        self.spec, self.student = choose_student(plan, cfg, self.n_out)
        if cfg.stages is None:  # the finest decoder stage a stem student has, below full resolution
            cfg = cfg.model_copy(update={"stages": ["bottleneck", f"dec{max(1, cfg.stem or 0)}"]})
        names = getattr(self.student, STAGES_ATTR)
        unknown = [s for s in cfg.stages or [] if s not in names]
        if unknown:
            raise MedalloyError(f"unknown stage '{unknown[0]}'", fix=f"choose stages from {', '.join(names)}")
        self.cfg = cfg

    def inputs(self) -> dict[str, Any]:
        return {"dataset": str(self.dss[0].root), "datasets": [str(d.root) for d in self.dss], "teacher": str(self.teacher)}

    def prepare(self, run: Run) -> None:
        if self.cfg.batch_size:
            self.plan = self.plan.model_copy(update={"batch_size": self.cfg.batch_size})
        # a dataset of natural images far from the plan's typical size trains at that size, as it is predicted (predict.py)
        self.rescaled: dict[str, str] = {}
        for d in self.dss:
            ratio = misfit(self.plan, dataset_geometry(d)) if self.plan.median_shape else None
            if ratio is not None:
                self.rescaled[d.name] = (
                    f"{d.name}: images x{ratio:.2f} off the plan's typical {'x'.join(map(str, self.plan.median_shape))} px, each resampled to it"
                )
        if self.rescaled:
            self.plan = self.plan.model_copy(update={"notes": self.plan.notes + list(self.rescaled.values())})
            if run.progress:
                print("\n".join(self.rescaled.values()))
        run.main(lambda: save_plan(self.plan, run.out / "plan.json"))

    def choose_split(self, run: Run) -> dict[str, Any]:
        """``split`` as given: ``{"train", "val"}`` for the first dataset, or ``{name: {"train", "val"}}``."""
        split = self.given_split
        given = {self.dss[0].name: split} if split is not None and "train" in split else split
        return split_record(self.cfg.fold, dataset_splits(run, self.dss, self.cfg, given))

    def train_spec(self, run: Run, split: dict[str, Any]) -> TrainSpec:
        batches = self._batches(run, split["datasets"])
        models: dict[str, nn.Module] = {"student": self.student, "teacher": self.teacher_model}
        trainable = ["student"]
        if "kernel" in self.terms:  # drawn after caching, as before specs
            models["adapters"] = _adapters(self.student, self.teacher_model, self.cfg.stages or [], self.plan)
            trainable.append("adapters")
        self._losses()
        student, plan, cfg = self.student, self.plan, self.cfg

        def predictor() -> Predictor:
            return Predictor(student, plan, device=next(student.parameters()).device, precision=cfg.train.precision, activation=self.activation)

        self.record = self._record()
        sets = [ValidationSet(predictor, prep, plan, name, classes) for name, prep, classes in self.val_sets]
        validate = dice_validation(sets) if sets else None
        return TrainSpec(models=models, trainable=trainable, step_fn=self._step, batches=batches, record=self.record, validate=validate)

    def _batches(self, run: Run, ids: dict[str, dict[str, list[str]]]) -> DatasetSteps:
        """Every dataset's cases cached (a partially labelled dataset validates on the classes it
        labels); one dataset a step, by the sqrt of its samples."""
        plan, cfg, seed = self.plan, self.cfg, self.cfg.train.seed
        samplers, samples, self.train_cases, self.val_sets = [], [], {}, []
        for d, is_full in zip(self.dss, self.full):
            rescale = d.name in self.rescaled
            train_prep = cache_cases(
                d, cases_of(d, ids[d.name]["train"]), plan, pad=True, seed=seed, desc=f"{d.name}: caching train", progress=run.progress, rescale=rescale
            )
            samplers.append(PatchSampler(train_prep, plan.patch_size, plan.batch_size, plan.dim, seed, plan.foreground_oversample, cfg.augment))
            self.train_cases[d.name] = len(train_prep)
            samples.append(sample_count(train_prep, plan.dim))
            # validation: a partially labelled dataset scores the classes it labels (its "background" hides the others)
            val_prep = cache_cases(
                d, cases_of(d, ids[d.name]["val"]), plan, pad=False, seed=seed, desc=f"{d.name}: caching val", progress=run.progress, rescale=rescale
            )
            if val_prep:
                labelled = None if is_full else [plan.label_values.index(v) for v in sorted(v for v in d.spec.labels.values() if v)]
                self.val_sets.append((d.name, val_prep, labelled))
        marginal = cfg.partial_labels == "marginal"
        return DatasetSteps(samplers, dataset_weights(samples, "sqrt"), seed, seg_weights=[1.0 if f or marginal else 0.0 for f in self.full])

    def _losses(self) -> None:
        """The terms' losses, and per dataset its segmentation loss and (sigmoid) the tasks it scores."""
        cfg, n_out = self.cfg, self.n_out
        self.kd = LogitKDLoss(cfg.temperature, binary=self.activation == "sigmoid")
        self.relation = {
            "affinity": SpatialAffinityLoss(cfg.max_positions, weighting="confidence"),
            "pairwise": SpatialAffinityLoss(cfg.max_positions, weighting="none"),
            "cross": SpatialAffinityLoss(cfg.max_positions, weighting="confidence", scope="batch"),
        }
        self.kernel = KernelMMDLoss(cfg.kernel, cfg.max_positions)
        self.cwd = ChannelWiseLoss(4.0)
        self.task_loss = TaskBCEDiceLoss(num_tasks=n_out)
        # per dataset: the classes (label values) it annotates, and its softmax segmentation loss
        self.annotated = [sorted(v for v in d.spec.labels.values() if v) for d in self.dss]
        self.dice_ce = [DiceCELoss() if f else MarginalDiceCELoss(n_out, a) for f, a in zip(self.full, self.annotated)] if self.activation == "softmax" else []
        # sigmoid: a task its annotators left out is not scored
        self.task_mask = [torch.tensor([float(k + 1 in a) for k in range(n_out)]) for a in self.annotated]
        self.feature_terms = {"kernel", "affinity", "pairwise", "cross"} & set(self.terms)
        w = cfg.weights
        self.feature_weights = {"kernel": w.kernel, "affinity": w.affinity, "pairwise": w.affinity, "cross": w.cross}

    def _seg_loss(self, logits: torch.Tensor, label: torch.Tensor, d: int) -> torch.Tensor:
        """``logits (B, K, *patch)``, ``label (B, 1, *patch)`` of dataset ``d`` -> its segmentation loss."""
        if self.activation == "softmax":
            return self.dice_ce[d](logits, label)
        n_out = self.n_out
        target = torch.cat([(label == k + 1).float() for k in range(n_out)], dim=1)
        return self.task_loss(logits, target, self.task_mask[d].to(logits.device).expand(logits.shape[0], n_out))

    def _step(self, models: dict, batch: dict) -> dict[str, torch.Tensor]:
        x, label, w = batch["image"], batch["label"], self.cfg.weights
        stages = (self.cfg.stages or []) if self.feature_terms else []
        with torch.no_grad(), FeatureTap(_tapped(models["teacher"]), stages) as tt:
            zt = models["teacher"](x)
        with FeatureTap(models["student"], stages) as ts:
            zs = models["student"](x)
        d = int(batch["dataset"])
        seg = self._seg_loss(zs, label, d) * batch["seg_weight"]  # 0: a partially labelled dataset taught by the teacher alone
        logged = {"seg": seg.detach()}
        if len(self.dss) > 1:  # each dataset's own curve; NaN: another dataset's step (every step logs the same keys)
            logged.update({ds_.name: seg.detach() if i == d else torch.full_like(seg.detach(), float("nan")) for i, ds_ in enumerate(self.dss)})
        total = seg
        if "logits" in self.terms:
            logged["logits"] = self.kd(zs, zt)
            total = total + w.logits * logged["logits"]
        if "cwd" in self.terms:
            logged["cwd"] = self.cwd(zs, zt)
            total = total + w.cwd * logged["cwd"]
        if self.feature_terms:
            conf = confidence(zt, self.activation)
            for term in sorted(self.feature_terms):
                if term == "kernel":
                    adapted = models["adapters"]({s: ts.features[s] for s in stages})
                    value = sum(self.kernel(adapted[s], tt.features[s]) for s in stages) / len(stages)
                else:
                    value = sum(self.relation[term](ts.features[s], tt.features[s], conf) for s in stages) / len(stages)
                logged[term] = value
                total = total + self.feature_weights[term] * value
        logged = {k: v.detach() for k, v in logged.items()}
        return {"loss": total, **{f"loss/{k}": v for k, v in logged.items()}}

    def _record(self) -> dict[str, Any]:
        """The checkpoints' record: the student's spec, and what prediction needs besides it (plan, activation)."""
        dss, cfg, tr = self.dss, self.cfg, self.teacher_record
        return {
            "method": METHOD,
            "name": f"student-{dss[0].name}",
            "tasks": [task_entry(dss[0])],
            "spec": self.spec.to_record(),
            "student_size": cfg.student,
            "datasets": [{"dataset": d.name, "folder": d.root.name, "fully_labelled": f, "annotated": a} for d, f, a in zip(dss, self.full, self.annotated)],
            "partial_labels": cfg.partial_labels,
            "plan": self.plan.model_dump(mode="json"),
            "activation": self.activation,
            "teacher": {
                "path": str(self.teacher),
                "method": tr.get("method"),
                "name": tr.get("name"),
                "params": count_parameters(self.teacher_model),
                "steps": tr.get("total_steps"),
            },  # fmt: skip
            "losses": cfg.losses,
            "params": count_parameters(self.student),
        }

    def result(self, summary: dict[str, Any]) -> dict[str, Any]:
        r = self.record
        return {
            "name": r["name"], "losses": self.cfg.losses, "train_cases": self.train_cases, "val_cases": {name: len(prep) for name, prep, _ in self.val_sets},
            "params": r["params"], "teacher_params": r["teacher"]["params"],
        }  # fmt: skip


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
    teacher alone). Each step trains on one dataset (sqrt of its 2D images or 3D volumes).
    ``split``: ``{"train": [ids], "val": [ids]}`` of the first dataset, or ``{name: {...}}`` per dataset."""
    dss = _datasets(dataset)
    if isinstance(overrides.get("augment"), str):  # a preset name: the YAML's own augment fields stay over it
        overrides = {**overrides, "augment": {"preset": overrides["augment"]}}
    cfg = resolve_config(DistillConfig, config, overrides, progress)
    return run_recipe(DistillRecipe(cfg, dss, teacher, split, progress), out, resume=resume, overwrite=overwrite, progress=progress)


def load_student(path: str | Path, device: str = "cpu") -> tuple[nn.Module, Plan, dict[str, Any]]:
    """The student network, plan and record of a distillation checkpoint; the record's ``spec`` is the
    current version's (records of earlier versions migrated)."""
    tensors, record = ckpt.load_checkpoint(path, method=METHOD, map_location=device)
    spec = read_spec(StudentSpec, record, path, tensors.keys())
    try:
        plan = Plan.model_validate(record["plan"])
    except (KeyError, ValidationError):
        raise MedalloyError("checkpoint record has no valid plan", path, "retrain with this medalloy version") from None
    model = build_student_net(spec)
    ckpt.load_module_state(model, ckpt.group(tensors, "model/student"), path, "student", "use the checkpoint with its own run")
    return model.eval(), plan, {**record, "spec": spec.to_record()}


register(METHOD, lambda path, device, dataset=None: load_student(path, device))
