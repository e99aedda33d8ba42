"""Relation-based distillation on the real data of ../shared/data: a tiny student against its teacher
and the baselines, on Dice, size, FLOPs and CPU latency per runtime.

    python -m benchmarks.distill [--data ../shared/data] [--teacher-steps 1500] [--steps 600]
                                 [--only polyp cxr] [--models teacher student_alone ...]
    python -m benchmarks.distill --measure      # then, on an idle machine: size, FLOPs, latency, int8

Domains (held-out cases as in benchmarks/experts.py: never used in training or model selection):
- ``polyp``: Kvasir + CVC in one dataset (two sources). Teacher: a medalloy expert trained on both
  centres (the experts benchmark's 128 px polyp plan); students distil it on both centres. Scored
  per source (``polyp/Kvasir``, ``polyp/CVC``). Unseen source: a teacher and students trained on
  Kvasir alone, scored on CVC (``Kvasir->CVC``).
- ``cxr``: JSRT (lung, heart). Teacher: the JSRT expert; students distil it on JSRT. Unseen source:
  the same models on Shenzhen's held-out radiographs (lung; ``JSRT->Shenzhen``).

Models: ``teacher`` (a medalloy expert, ``--teacher-steps`` steps) and the students (tiny,
~0.35 M parameters, ``--steps`` steps each, the same seed); fixed step counts, so the training
pass gives the same models however busy the machine is (the two domains may run side by side,
``--threads 1`` each). ``student_alone``, ``logit_kd`` and ``relation_kd`` are the recipe's default
student (``recipes/students.default_stem``: a stem of two at both domains' patches, the image's 2x2
pixel blocks folded into channels and the network from 1/4), so the unseen-source rows compare
like for like; ``student_alone_full``, ``logit_kd_full``, ``relation_kd_full`` the same at full
resolution (``--stem-depth 0``), ``relation_kd_stem`` with a stem of one (``--stem``); the issue's
baselines and ablations ``skd``, ``cwd``, ``relation_no_kernel`` and ``relation_no_affinity`` are
default students with unseen-source rows, ``skd_full``, ``cwd_full``, ``relation_no_kernel_full``
and ``relation_no_affinity_full`` the same at full resolution (in-domain only);
``relation_kd_x10`` and ``relation_kd_x30`` are ``relation_kd`` with its kernel and affinity terms
weighted 10 and 30 (1 by default), to be chosen between by the validation Dice each student records;
``relation_kd_cross`` and ``relation_kd_x10_cross`` add relations across the images of a batch (the
recipe's ``--losses relation_cross``), at weight 1 and 10. Each model's settings are one entry of
``benchmarks/configs/distill/_models.yaml`` (a new model is a new entry there).
Multi-source (chest X-ray): ``logit_kd_multi``, ``relation_kd_multi`` and ``relation_kd_x10_multi`` are
those rows trained from the JSRT teacher on JSRT's and Shenzhen's images at once (Shenzhen labels the
lung only: its lung labels train through the marginal loss, the heart comes from the teacher), scored
on both held-out sets.
Per model: Dice per task/source; then ``--measure`` (alone on the machine: it times) adds
parameters, ONNX file size, GFLOPs (PyTorch's FlopCounterMode) and latency at the plan's patch,
batch 1, median of 50 after 5 warm-up calls, with 2 threads: PyTorch eager fp32, bf16 autocast,
ONNX Runtime fp32 and int8 (static, calibrated on 32 training patches; the teacher's and the
relation student's int8 Dice too).

``--only DOMAIN`` / ``--models M ...`` rerun parts and merge them into the results. Writes
``benchmarks/results/distill/results.json`` and ``results.md``; what the runs showed is in ``NOTES.md`` beside
them, written by people (the script never writes it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from benchmarks.common import PLAN_OPTIONS, dataset_path, predict_and_score, splits

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "distill"
DEFAULT_DATA = Path(os.environ.get("MEDALLOY_SHARED_DATA", HERE.parent.parent / "shared" / "data"))

ARMS_FILE = HERE / "configs" / "distill" / "_models.yaml"  # the arms (models) and their settings, one entry each


class ArmsError(ValueError):
    """ARMS_FILE cannot be used: the message names the file, the arm and the fix."""


class Arm(BaseModel):
    """One arm of ARMS_FILE (the file's header says what each field means)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    loss: str | None = None  # the recipe's loss preset (--losses); None only for a multi-source arm
    stem: int | None = None  # None: the recipe's default stem
    weights: dict[str, float] = {}  # DistillWeights' fields; absent: 1 each
    upsample: Literal["shuffle"] | None = None
    params: int | None = None  # None: the tiny student
    augment: Literal["default", "strong"] = "default"
    separable: bool = False
    multi_of: str | None = None  # a multi-source arm: the single-source arm whose settings it trains
    unseen: bool = False  # an unseen-source row
    baselines: tuple[str, ...] | None = None  # a relation arm's targets: the arms it must beat
    why: str = ""

    @property
    def default_student(self) -> bool:
        """The recipe's default student on the default data: only the loss and its weights may differ."""
        return (
            self.stem is None and self.upsample is None and self.params is None and not self.separable and self.augment == "default" and self.multi_of is None
        )


@dataclass(frozen=True)
class ArmTable:
    """ARMS_FILE read and checked."""

    arms: dict[str, Arm]  # in the order of the results' tables (after the teacher)
    unseen: list[str]  # the unseen-source rows in their order (after the teacher)
    targets: list[str]  # the arms with baselines, in the targets' order


def load_arms(path: Path = ARMS_FILE) -> ArmTable:
    """The arms of ``path``, checked: an unknown field, an arm without a loss (or multi_of), or a name
    where an arm is needed that is not one, is an ArmsError of one line naming the file and the arm."""
    where = path.relative_to(HERE.parent) if path.is_relative_to(HERE.parent) else path
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ArmsError(f"{where}: not valid YAML ({str(exc).splitlines()[0]}); fix its syntax") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("arms"), dict) or not raw["arms"]:
        raise ArmsError(f"{where}: no `arms:` mapping (arm name -> its settings); add one")
    keys = ("arms", "unseen_order", "targets_order")
    if unknown := sorted(set(raw) - set(keys)):
        raise ArmsError(f"{where}: unknown key {unknown[0]!r} (keys: {', '.join(keys)}); remove it")
    arms: dict[str, Arm] = {}
    for name, fields in raw["arms"].items():
        at = f"{where}: arm {name!r}"
        if name == "teacher":
            raise ArmsError(f"{at}: the teacher is not an arm (every table starts with it); rename the arm")
        if not isinstance(fields, dict):
            raise ArmsError(f"{at}: its settings are not a mapping; write `loss: ...` and the other fields")
        if unknown := sorted(set(fields) - set(Arm.model_fields)):
            raise ArmsError(f"{at}: unknown field {unknown[0]!r} (fields: {', '.join(Arm.model_fields)}); fix or remove it")
        try:
            arm = Arm.model_validate(fields)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ArmsError(f"{at}: field {'.'.join(map(str, err['loc']))!r}: {err['msg']}; fix the value") from None
        if arm.multi_of is None and arm.loss is None:
            raise ArmsError(f"{at}: no loss (the recipe's loss preset, e.g. `loss: relation`); add one, or `multi_of:` a single-source arm")
        if arm.multi_of is not None:
            if more := sorted(set(fields) - {"multi_of", "why"}):
                raise ArmsError(f"{at}: a multi-source arm takes every setting from its multi_of arm, not {more[0]!r}; remove it")
            if arm.multi_of not in arms or arms[arm.multi_of].multi_of is not None:
                raise ArmsError(f"{at}: multi_of {arm.multi_of!r} is not a single-source arm above it; name one")
        arms[name] = arm
    for name, arm in arms.items():
        if bad := [b for b in arm.baselines or () if b == name or b not in arms or arms[b].multi_of is not None]:
            raise ArmsError(f"{where}: arm {name!r}: baseline {bad[0]!r} is not another single-source arm; name one")

    def order(key: str, flagged: list[str], flag: str) -> list[str]:
        listed = raw.get(key) or []
        if not isinstance(listed, list):
            raise ArmsError(f"{where}: {key} is not a list of arm names; write [name, ...]")
        for i, name in enumerate(listed):
            if name not in flagged or name in listed[:i]:
                raise ArmsError(f"{where}: {key}: arm {name!r} is {'named twice' if name in listed[:i] else f'not an arm with {flag}'}; remove it")
        return [*listed, *(n for n in flagged if n not in listed)]

    unseen = order("unseen_order", [n for n, a in arms.items() if a.unseen], "unseen: true")
    return ArmTable(arms, unseen, order("targets_order", [n for n, a in arms.items() if a.baselines is not None], "baselines"))


ARM_TABLE = load_arms()
ARMS = ARM_TABLE.arms
MULTI = {name: arm.multi_of for name, arm in ARMS.items() if arm.multi_of is not None}  # multi-source arm -> its single-source arm
MODELS = ["teacher", *ARMS]
UNSEEN_MODELS = ["teacher", *ARM_TABLE.unseen]  # the students trained on one centre only, for the unseen-source row
RELATION_VS_BASELINES = {name: ARMS[name].baselines or () for name in ARM_TABLE.targets}  # relation KD and the baselines it must beat
# the relation-KD settings a user chooses between by validation Dice: relation KD at the default student, its weights and scope aside
WEIGHT_CHOICES = [name for name, arm in ARMS.items() if arm.loss in ("relation", "relation_cross") and arm.default_student]
# the datasets each domain's multi-source arms (multi_of in ARMS_FILE) train on at once
MULTI_SOURCES = {"cxr": ["JSRT", "Shenzhen"]}
# domain -> (members of the training set, per-source test sets {source: (experts-benchmark name, label names)}, unseen (train -> test))
DOMAINS: dict[str, dict[str, Any]] = {
    "polyp": {"train": ["Polyp-Kvasir", "Polyp-CVC"], "unseen_train": ["Polyp-Kvasir"], "unseen_test": "Polyp-CVC", "unseen_key": "Kvasir->CVC"},
    "cxr": {"train": ["JSRT"], "unseen_train": ["JSRT"], "unseen_test": "Shenzhen", "unseen_key": "JSRT->Shenzhen"},
}
LATENCY_RUNS, LATENCY_WARMUP = 50, 5
DOMAIN_NAMES = {"cxr": "chest X-ray"}  # how the markdown names a domain


def log(msg: str) -> None:
    print(f"[distill] {msg}", flush=True)


def source_of(name: str) -> str:
    return name.split("-")[-1]


def union_split(members: list[str], data: Path, work: Path, seed: int) -> dict[str, list[str]]:
    parts = [splits(m, dataset_path(m, data, work), seed) for m in members]
    return {k: [c for p in parts for c in p[k]] for k in ("train", "val", "test")}


def score(model_path: Path, test: str, data: Path, work: Path, key: str, seed: int, labels: dict[str, int] | None = None) -> dict[str, float]:
    """Dice per label of ``model_path`` (run folder or .onnx) on the held-out cases of ``test``."""
    from medalloy.data.dataset import RawDataset

    ds_path = dataset_path(test, data, work)
    ids = splits(test, ds_path, seed)["test"]
    fg = {k: v for k, v in RawDataset(ds_path).spec.labels.items() if v}
    keep = {k: v for k, v in fg.items() if labels is None or labels.get(k) == v}
    scores, _ = predict_and_score(model_path, ds_path, ids, keep, key, work)
    return {label: s["dice"] for label, s in scores.items()}


def finished(run: Path) -> bool:
    path = run / "run.json"
    return path.exists() and json.loads(path.read_text(encoding="utf-8")).get("status") == "done"


def train_teacher(domain: str, members: list[str], data: Path, work: Path, steps: int, seed: int, tag: str) -> Path:
    """The domain's teacher (an expert of ``steps`` steps); a finished run of it is reused (delete it to retrain)."""
    from medalloy.data.dataset import RawDataset
    from medalloy.planning.fingerprint import fingerprint
    from medalloy.planning.planner import plan_dataset
    from medalloy.recipes.expert import train_expert

    ds_path = dataset_path(members[0], data, work)
    split = union_split(members, data, work, seed)
    ds = RawDataset(ds_path)
    plan = plan_dataset(ds, fingerprint(ds, progress=False), **PLAN_OPTIONS.get(members[0], {}))
    run = work / "runs" / domain / f"teacher{tag}"
    if finished(run) and json.loads((run / "run.json").read_text(encoding="utf-8")).get("steps") == steps:
        log(f"{domain} teacher{tag}: reusing {run}")
        return run
    log(f"{domain} teacher{tag}: expert on {', '.join(members)} ({len(split['train'])} cases), patch {plan.patch_size}, {steps} steps")
    train_expert(
        ds_path, run, plan=plan, split={"train": split["train"], "val": split["val"]}, overwrite=True, progress=sys.stderr.isatty(),
        steps=steps, val_every=max(100, steps // 4), seed=seed,
    )  # fmt: skip
    return run


def train_student(
    domain: str, model: str, members: list[str], teacher: Path, data: Path, work: Path, steps: int, seed: int, tag: str, student_seed: int, reuse: bool = False
) -> tuple[Path, dict[str, Any]]:
    """One student; ``seed`` picks the split (as for the teacher), ``student_seed`` its training
    (initialisation, batches): one run folder per student seed. ``reuse``: a finished run of the same
    steps is scored, not retrained."""
    from medalloy.data.dataset import RawDataset
    from medalloy.recipes.distill import DistillConfig, DistillWeights, train_distill

    paths = list(dict.fromkeys(dataset_path(m, data, work) for m in members))  # polyp's two centres share one dataset
    if len(paths) == 1:
        dataset: Path | list[Path] = paths[0]
        union = union_split(members, data, work, seed)
        split: dict[str, Any] = {"train": union["train"], "val": union["val"]}
    else:  # several datasets: the recipe takes a split per dataset
        dataset = paths
        split = {RawDataset(p).name: {k: v for k, v in splits(m, p, seed).items() if k != "test"} for m, p in zip(members, paths)}
    run = work / "runs" / domain / f"{model}{tag}{f'-seed{student_seed}' if student_seed != seed else ''}"
    if reuse and finished(run) and json.loads((run / "run.json").read_text(encoding="utf-8")).get("steps") == steps:
        log(f"{domain} {run.name}: reusing {run}")
        return run, json.loads((run / "run.json").read_text(encoding="utf-8"))
    log(f"{domain} {run.name}: {steps} steps on {', '.join(members)}")
    arm = ARMS[MULTI.get(model, model)]  # a multi-source arm trains its single-source arm's settings
    config = DistillConfig(weights=DistillWeights(**arm.weights), augment=arm.augment)
    res = train_distill(
        dataset, teacher, run, config, losses=arm.loss, student="tiny" if arm.params is None else arm.params, separable=arm.separable, stem=arm.stem, upsample=arm.upsample, split=split,
        overwrite=True, progress=sys.stderr.isatty(), steps=steps, val_every=max(100, steps // 4), seed=student_seed,
    )  # fmt: skip
    return run, res


def mean_dice(per_seed: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(float(np.mean([d[k] for d in per_seed])), 4) for k in per_seed[0]}


def measure(run: Path, calibration: Path, work: Path, key: str) -> dict[str, Any]:
    """Parameters, ONNX size, GFLOPs and latency per runtime of a run's best model; the int8 graph's path."""
    import torch

    from medalloy.engine.latency import model_latency_ms
    from medalloy.export import export_onnx
    from medalloy.interop.onnx_runtime import load_onnx
    from medalloy.models.flops import forward_gflops
    from medalloy.models.unet import count_parameters
    from medalloy.predict import load_model

    torch.set_num_threads(2)
    model, plan, _ = load_model(run / "checkpoints" / "best.safetensors")
    shape = (plan.in_channels, *plan.patch_size)
    fp32, int8 = work / "onnx" / f"{key}.onnx", work / "onnx" / f"{key}.int8.onnx"
    export_onnx(run, fp32, overwrite=True)
    export_onnx(run, int8, overwrite=True, quantize="int8", calibration=calibration)
    latency = {
        "eager_fp32": model_latency_ms(model, shape, "fp32", LATENCY_RUNS, LATENCY_WARMUP),
        "bf16": model_latency_ms(model, shape, "bf16", LATENCY_RUNS, LATENCY_WARMUP),
        "onnx_fp32": model_latency_ms(load_onnx(fp32, threads=2)[0], shape, "fp32", LATENCY_RUNS, LATENCY_WARMUP),
        "onnx_int8": model_latency_ms(load_onnx(int8, threads=2)[0], shape, "fp32", LATENCY_RUNS, LATENCY_WARMUP),
    }
    return {
        "params": count_parameters(model), "size_mb": round(fp32.stat().st_size / 2**20, 3), "size_mb_int8": round(int8.stat().st_size / 2**20, 3),
        "gflops": round(forward_gflops(model, shape), 3), "patch": list(plan.patch_size),
        "latency_ms": {k: round(v, 2) for k, v in latency.items()}, "int8_graph": str(int8),
    }  # fmt: skip


def run_domain(
    domain: str, models: list[str], data: Path, work: Path, teacher_steps: int, steps: int, seed: int, student_seeds: list[int], reuse: bool = False
) -> dict[str, Any]:
    """The domain's teacher and students (each student once per seed of ``student_seeds``: its Dice
    is the mean over them, ``dice_per_seed`` keeps each), then the unseen-source rows."""
    spec = DOMAINS[domain]
    members = spec["train"]
    out: dict[str, Any] = {"models": {}, "unseen_source": {}, "unseen_source_per_seed": {}}
    teacher = train_teacher(domain, members, data, work, teacher_steps, seed, "")
    runs: dict[str, list[Path]] = {}
    for model in [m for m in models if m not in MULTI]:
        if model == "teacher":
            trained = [(teacher, json.loads((teacher / "run.json").read_text(encoding="utf-8")))]
        else:
            trained = [train_student(domain, model, members, teacher, data, work, steps, seed, "", s, reuse) for s in student_seeds]
        runs[model] = [run for run, _ in trained]
        per_seed = []
        for run, _ in trained:
            dice = {}
            for member in members:
                for label, d in score(run, member, data, work, f"{domain}-{run.name}-{member}", seed).items():
                    dice[f"{label}/{source_of(member)}"] = d
            per_seed.append(dice)
        run, res = trained[0]
        entry: dict[str, Any] = {"run": str(run), "train_minutes": round(res["seconds"] / 60, 2), "steps": int(res["steps"]), "params": int(res["params"])}
        entry["dice"] = mean_dice(per_seed)
        best = [(r.get("best") or {}).get("value") for _, r in trained]
        if model != "teacher" and None not in best:  # what a user could choose a setting by: the best validation Dice on the training source
            entry["val_dice"] = round(float(np.mean(best)), 4)
        if model != "teacher" and len(student_seeds) > 1:
            entry["seeds"], entry["dice_per_seed"] = list(student_seeds), per_seed
        entry["dice_mean"] = round(float(np.mean(list(entry["dice"].values()))), 4)
        out["models"][model] = entry
        log(f"{domain} {model}: Dice {entry['dice']} params {entry['params']}")
    # unseen source: trained on one centre, scored on the other
    test = spec["unseen_test"]
    from medalloy.data.dataset import RawDataset

    shared = {k: v for k, v in RawDataset(dataset_path(test, data, work)).spec.labels.items() if v}
    tag = "-" + source_of(spec["unseen_train"][0])
    for model in [m for m in UNSEEN_MODELS if m in models]:
        if spec["unseen_train"] == members:  # the domain's own models were trained on one centre
            unseen_runs = runs[model]
        elif model == "teacher":
            unseen_runs = [train_teacher(domain, spec["unseen_train"], data, work, teacher_steps, seed, tag)]
        else:
            t = train_teacher(domain, spec["unseen_train"], data, work, teacher_steps, seed, tag)
            unseen_runs = [train_student(domain, model, spec["unseen_train"], t, data, work, steps, seed, tag, s, reuse)[0] for s in student_seeds]
        values = []
        for run in unseen_runs:
            dice = score(run, test, data, work, f"{domain}-unseen-{run.name}", seed, labels=shared)
            values.append(round(float(np.mean(list(dice.values()))), 4))
        out["unseen_source"][model] = {spec["unseen_key"]: round(float(np.mean(values)), 4)}
        if len(values) > 1:
            out["unseen_source_per_seed"][model] = {spec["unseen_key"]: values}
    sources = MULTI_SOURCES.get(domain)
    for model in [m for m in MULTI if m in models and sources]:
        per_seed = []
        for s in student_seeds:
            run, _ = train_student(domain, model, sources, teacher, data, work, steps, seed, "", s, reuse)
            dice = {}
            for member in sources:
                for label, d in score(run, member, data, work, f"{domain}-{run.name}-{member}", seed).items():
                    dice[f"{label}/{source_of(member)}"] = d
            per_seed.append(dice)
        out.setdefault("multi_source", {})[model] = {
            "trained_on": sources,
            "dice": mean_dice(per_seed),
            "seeds": list(student_seeds),
            "dice_per_seed": per_seed,
        }
        log(f"{domain} {model}: Dice {out['multi_source'][model]['dice']}")
    return out


def measure_all(res: dict[str, Any], data: Path, work: Path, seed: int, domains: list[str], models: list[str]) -> None:
    """The timing pass (run alone): size, FLOPs, latency per runtime and int8 Dice of the trained models named."""
    for domain, v in res.get("domains", {}).items():
        if domain not in domains:
            continue
        members = DOMAINS[domain]["train"]
        calibration = dataset_path(members[0], data, work) / "imagesTr"
        for model, entry in v["models"].items():
            if model not in models:
                continue
            m = measure(Path(entry["run"]), calibration, work, f"{domain}-{model}")
            if model in ("teacher", *RELATION_VS_BASELINES):  # what int8 costs in Dice
                entry["dice_int8"] = {}
                for member in members:
                    for label, d in score(Path(m["int8_graph"]), member, data, work, f"{domain}-{model}-{member}-int8", seed).items():
                        entry["dice_int8"][f"{label}/{source_of(member)}"] = d
            m.pop("int8_graph")
            entry.update(m)
            entry.pop("shares_measures_of", None)
            log(f"{domain} {model}: params {entry['params']} GFLOPs {entry['gflops']} latency {entry['latency_ms']}")


# What --measure adds that depends on the architecture only (not on the weights: int8 Dice does)
ARCHITECTURE_MEASURES = ("size_mb", "size_mb_int8", "gflops", "patch", "latency_ms")


def merge(old: dict[str, Any], domain: str, new: dict[str, Any]) -> dict[str, Any]:
    """``new``'s models and unseen rows into ``old``'s domain; a retrained model of the same size
    keeps the previous --measure pass's architecture measures, and says so."""
    doms = old.get("domains", {})
    mine = doms.setdefault(domain, {"models": {}, "unseen_source": {}})
    for name, entry in new["models"].items():
        before = mine["models"].get(name, {})
        shared = "shares_measures_of" in before  # summarise() shares those afresh
        if "latency_ms" not in entry and "latency_ms" in before and before.get("params") == entry.get("params") and not shared:
            entry.update({k: before[k] for k in ARCHITECTURE_MEASURES if k in before})
            entry["measured"] = before.get("measured") or "an earlier --measure pass of the same architecture (the model was retrained since)"
    mine["models"].update(new["models"])
    mine["unseen_source"].update(new["unseen_source"])
    for name in new["unseen_source"]:  # a rerun with one seed drops an older per-seed list of the same model
        mine.setdefault("unseen_source_per_seed", {}).pop(name, None)
    mine.setdefault("unseen_source_per_seed", {}).update(new.get("unseen_source_per_seed", {}))
    if new.get("multi_source"):
        mine.setdefault("multi_source", {}).update(new["multi_source"])
    return {**old, "domains": doms}


def architecture(name: str, entry: dict[str, Any]) -> tuple[Any, ...]:
    """What fixes a row's network (so its size, FLOPs and time): loss and loss weights do not."""
    arm = ARMS.get(name) or Arm()  # a row of an arm no longer in the table: the default student
    return ("teacher",) if name == "teacher" else ("student", "default" if arm.stem is None else arm.stem, arm.separable, entry.get("params"))


def share_architecture_measures(models: dict[str, dict[str, Any]]) -> None:
    """A row that --measure did not time takes the measures of a timed row of the same network (the
    students of one architecture trained with other losses), naming it, so every row carries its time."""
    timed = {architecture(n, e): n for n, e in models.items() if e.get("latency_ms") and "shares_measures_of" not in e}
    for name, entry in models.items():
        source = timed.get(architecture(name, entry))
        if (entry.get("latency_ms") is None or "shares_measures_of" in entry) and source is not None and source != name:
            entry.update({k: models[source][k] for k in ARCHITECTURE_MEASURES if k in models[source]})
            entry["shares_measures_of"] = source


def reference_domain(entries: dict[str, dict[str, Any]]) -> str:
    """Of a row's per-domain entries, the one whose size and latency it shows: the chest X-ray one
    (the issue's 224 px) where measured, else a measured one, else the chest X-ray or first one."""
    order = sorted(entries, key=lambda d: d != "cxr")
    return next((d for d in order if entries[d].get("latency_ms")), order[0])


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    """The issue's shape: per model, Dice over every task/source of both domains; size and latency at
    224 px (the chest X-ray domain: the issue's reference size), else the other domain's."""
    doms = res["domains"]
    for v in doms.values():
        share_architecture_measures(v["models"])
    models: dict[str, Any] = {}
    for name in MODELS:
        entries = {d: v["models"][name] for d, v in doms.items() if name in v["models"]}
        if not entries:
            continue
        ref = entries[reference_domain(entries)]
        dice = {k: v for e in entries.values() for k, v in e["dice"].items()}
        models[name] = {
            "dice_mean": round(float(np.mean(list(dice.values()))), 4), "dice": dice,
            "params": ref["params"], "size_mb": ref.get("size_mb"), "gflops": ref.get("gflops"), "latency_ms": ref.get("latency_ms"),
        }  # fmt: skip
    unseen: dict[str, Any] = {}
    per_seed: dict[str, Any] = {}
    for v in doms.values():
        for name, rows in v["unseen_source"].items():
            unseen.setdefault(name, {}).update(rows)
        for name, rows in v.get("unseen_source_per_seed", {}).items():
            per_seed.setdefault(name, {}).update(rows)
    return {**res, "models": models, "unseen_source": unseen, "unseen_source_per_seed": per_seed}


def fastest(lat: dict[str, float]) -> tuple[str, float]:
    k = min((k for k, v in lat.items() if v is not None), key=lambda k: lat[k])
    return k, lat[k]


def rerun_command(res: dict[str, Any], results: Path | None = None) -> str:
    """The command line of the settings ``res`` records (step counts, seeds) writing into
    ``results``, and where the rows' student seeds differ, that they are per row in the JSON."""
    if "steps" not in res or "teacher_steps" not in res:
        return "`python -m benchmarks.distill`"
    cmd = ["python -m benchmarks.distill", f"--teacher-steps {res['teacher_steps']}", f"--steps {res['steps']}"]
    if res.get("seed", 0):
        cmd.append(f"--seed {res['seed']}")
    seed = res.get("seed", 0)
    student_seeds = {tuple(m.get("seeds") or [seed]) for v in res.get("domains", {}).values() for n, m in v["models"].items() if n != "teacher"}
    if len(student_seeds) == 1 and len(only := next(iter(student_seeds))) > 1:
        cmd.append("--student-seeds " + " ".join(map(str, only)))
    if results is not None and results.resolve() != RESULTS.resolve():
        where = results.resolve()
        cmd.append(f"--results {where.relative_to(HERE.parent) if where.is_relative_to(HERE.parent) else where}")
    tail = " (each row's student seeds: `seeds` in results.json)" if len(student_seeds) > 1 else ""
    return f"`{' '.join(cmd)}`{tail}"


def markdown(res: dict[str, Any], results: Path | None = None) -> str:
    models, unseen = res["models"], res["unseen_source"]
    keys = sorted({k for m in models.values() for k in m["dice"]})
    lines = [
        "# Distillation: a tiny student against its teacher",
        "",
        f"Teacher: a medalloy expert per domain ({res['teacher_steps']} steps); students: {res['steps']} steps each, tiny "
        "(~0.35 M parameters). Held-out cases of the experts benchmark. Latency: batch 1 at the plan's patch, median of "
        f"{LATENCY_RUNS} calls after {LATENCY_WARMUP} warm-up, 2 threads; size = the fp32 ONNX file. Rerun: {rerun_command(res, results)}.",
        "",
        "| model | " + " | ".join(keys) + " | mean | params | MB | GFLOPs | eager fp32 ms | bf16 ms | ONNX fp32 ms | ONNX int8 ms |",
        "|---|" + "---|" * (len(keys) + 8),
    ]
    for name, m in models.items():
        lat = m["latency_ms"] or {}
        fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731  (not measured yet: --measure)
        lines.append(
            f"| {name} | "
            + " | ".join(f"{m['dice'][k]:.3f}" if k in m["dice"] else "-" for k in keys)
            + f" | {m['dice_mean']:.3f}{'' if len(m['dice']) == len(keys) else '*'} | {m['params']:,} | "
            f"{fmt(m['size_mb'], '.2f')} | {fmt(m['gflops'], '.2f')} | "
            + " | ".join(fmt(lat.get(k), ".1f") for k in ("eager_fp32", "bf16", "onnx_fp32", "onnx_int8"))
            + " |"
        )
    doms = res.get("domains", {})
    teachers = {d: v["models"]["teacher"] for d, v in doms.items() if "teacher" in v["models"]}
    shown = reference_domain(teachers) if teachers else "cxr"  # the domain summarise() takes sizes and latencies from
    patch = next((m["patch"] for m in doms.get(shown, {}).get("models", {}).values() if m.get("patch")), None)
    at = f" ({' x '.join(map(str, patch))})" if patch else ""
    lines += ["", f"Sizes and latencies are the {DOMAIN_NAMES.get(shown, shown)} domain's{at}; per domain in `results.json`."]
    if any(len(m["dice"]) < len(keys) for m in models.values()):
        lines.append("\\* the mean over the tasks of the domains the model was trained in (- : not trained there).")
    shared: dict[str, list[str]] = {}
    for v in res["domains"].values():
        for name, m in v["models"].items():
            if "shares_measures_of" in m and name not in shared.get(m["shares_measures_of"], []):
                shared.setdefault(m["shares_measures_of"], []).append(name)
    for source, names in shared.items():
        lines.append(f"{', '.join(names)}: {source}'s network with other losses, so {source}'s size, FLOPs and times (timed once).")
    lines.append("")
    if unseen:
        cols = sorted({k for v in unseen.values() for k in v})
        lines += ["## Unseen source (trained on one centre, scored on the other)", "", "| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        seeds = res.get("unseen_source_per_seed", {})

        def cell(name: str, c: str) -> str:
            row, each = unseen[name], seeds.get(name, {}).get(c)
            if c not in row:
                return ""
            return f"{row[c]:.3f}" + (f" ({' / '.join(f'{v:.3f}' for v in each)})" if each else "")

        for name in unseen:
            lines.append(f"| {name} | " + " | ".join(cell(name, c) for c in cols) + " |")
        if seeds:
            lines += ["", "A student's row with seeds in brackets: the mean over its training seeds, then each seed's (splits and teacher fixed)."]
        lines.append("")
    lines += multi_source_lines(res)
    val = {d: {name: m["val_dice"] for name, m in v["models"].items() if "val_dice" in m} for d, v in res["domains"].items()}
    if any(val.values()):
        doms = [d for d in val if val[d]]
        lines += [
            "## Validation Dice on the training sources (what a setting is chosen by)", "",
            "| model | " + " | ".join(doms) + " |", "|---|" + "---|" * len(doms),
        ]  # fmt: skip
        for name in [n for n in MODELS if any(n in val[d] for d in doms)]:
            lines.append(f"| {name} | " + " | ".join(f"{val[d][name]:.3f}" if name in val[d] else "" for d in doms) + " |")
        lines += ["", "The best checkpoint's validation Dice (the held-out cases are not used), mean over the student's seeds.", ""]
    int8 = [(d, name, m) for d, v in res["domains"].items() for name, m in v["models"].items() if "dice_int8" in m]
    if int8:
        lines += ["## int8 (ONNX Runtime static quantization) vs fp32 Dice", "", "| domain | model | task/source | fp32 | int8 |", "|---|---|---|---|---|"]
        for d, name, m in int8:
            for k, v in m["dice_int8"].items():
                lines.append(f"| {d} | {name} | {k} | {m['dice'][k]:.3f} | {v:.3f} |")
        lines.append("")
    lines += ["## Targets", ""] + targets(res) + [""]
    lines += ["Notes (written by people, not generated): [NOTES.md](NOTES.md).", ""]
    return "\n".join(lines)


def single_source_scores(v: dict[str, Any], domain: str, name: str, cols: list[str]) -> dict[str, float]:
    """A single-source row's Dice per column: its own, and its unseen-source score for the other
    dataset's column where it has one (the unseen row is the mean over the labels both datasets share)."""
    spec = DOMAINS[domain]
    dice = dict(v["models"].get(name, {}).get("dice", {}))
    row = v["unseen_source"].get(name, {}).get(spec["unseen_key"])
    other = [c for c in cols if c.endswith("/" + source_of(spec["unseen_test"]))]
    if row is not None and len(other) == 1:
        dice[other[0]] = row
    return dice


def multi_source_lines(res: dict[str, Any]) -> list[str]:
    """Per domain with multi-source students: each beside its single-source row (whose score on the
    other dataset is its unseen-source row) and the teacher."""
    out = []
    for domain, v in res.get("domains", {}).items():
        multi = v.get("multi_source") or {}
        if not multi:
            continue
        spec = DOMAINS[domain]
        cols = sorted({k for m in multi.values() for k in m["dice"]})
        lines = [
            f"## Multi-source students ({' + '.join(MULTI_SOURCES[domain])} images)", "",
            "| model | trained on | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols),
        ]  # fmt: skip
        for name in ["teacher", *dict.fromkeys(MULTI[m] for m in multi)]:
            if name in v["models"]:
                d = single_source_scores(v, domain, name, cols)
                lines.append(f"| {name} | {' + '.join(spec['unseen_train'])} | " + " | ".join(f"{d[c]:.3f}" if c in d else "" for c in cols) + " |")
        for name, m in multi.items():
            lines.append(f"| {name} | {' + '.join(m['trained_on'])} | " + " | ".join(f"{m['dice'][c]:.3f}" if c in m["dice"] else "" for c in cols) + " |")
        lines += [
            "", f"A `*_multi` row: the named row's loss and weights, trained from the same teacher on the images of "
            f"{' and '.join(MULTI_SOURCES[domain])} at once (a dataset that labels only some of the teacher's classes trains those through "
            "the marginal loss, the recipe's default `partial_labels: marginal`), mean over its seeds. Single-source rows on the other dataset: their unseen-source score.", "",
        ]  # fmt: skip
        out += lines
    return out


def targets(res: dict[str, Any]) -> list[str]:
    models, unseen = res["models"], res["unseen_source"]
    if "teacher" not in models or "relation_kd" not in models:
        return ["- not measured yet (teacher and relation_kd needed)"]
    t, s = models["teacher"], models["relation_kd"]
    out = []
    ratio = t["params"] / s["params"]
    for name in RELATION_VS_BASELINES:
        if name not in models:
            continue
        s = models[name]
        keys = [k for k in s["dice"] if k in t["dice"]]  # the tasks it was trained for (it may cover one domain only)
        keep = float(np.mean([s["dice"][k] for k in keys])) / max(float(np.mean([t["dice"][k] for k in keys])), 1e-9)
        label = "relation KD" if name == "relation_kd" else name
        out.append(f"- {label} keeps {100 * keep:.1f} % of the teacher's mean Dice (target >= 97 %): {'met' if keep >= 0.97 else '**missed**'}")
        if name == "relation_kd":
            out.append(f"- {ratio:.1f}x fewer parameters (target >= 10x): {'met' if ratio >= 10 else '**missed**'}")
        if not t["latency_ms"] or not s["latency_ms"]:
            out.append(f"- latency of {name}: not measured yet (`--measure`)")
        else:
            (tk, tv), (sk, sv) = fastest(t["latency_ms"]), fastest(s["latency_ms"])
            speed = tv / sv
            out.append(
                f"- latency of {name}, each in its fastest runtime: teacher {tv:.1f} ms ({tk}), student {sv:.1f} ms ({sk}): {speed:.1f}x (target >= 5x): {'met' if speed >= 5 else '**missed**'}"
            )
    for name, base in [(n, b) for n, bases in RELATION_VS_BASELINES.items() for b in bases]:
        if name in unseen and base in unseen:
            for k, v in unseen[name].items():
                b = unseen[base].get(k)
                if b is not None:
                    diffs = paired_differences(res, name, base, k)
                    pairs = "" if diffs is None else f" (paired by seed: {paired_summary(diffs)})"
                    out.append(
                        f"- unseen source {k}: {name.replace('_kd', ' KD').replace('_', ' ')} {v:.3f} vs {base} {b:.3f}: {'met' if v > b else '**missed**'}{pairs}"
                    )
    out += chosen_by_validation(res)
    return out


def paired_differences(res: dict[str, Any], name: str, base: str, key: str) -> list[float] | None:
    """``name`` minus ``base`` on the unseen-source row ``key``, seed by seed: only where both rows
    were trained with the same student seeds (a seed fixes initialisation and batches, so the pair
    shares everything but the loss); None where they were not, or one of them has a single seed."""
    for v in res.get("domains", {}).values():
        a = v.get("unseen_source_per_seed", {}).get(name, {}).get(key)
        b = v.get("unseen_source_per_seed", {}).get(base, {}).get(key)
        seeds_a, seeds_b = v["models"].get(name, {}).get("seeds"), v["models"].get(base, {}).get("seeds")
        if a and b and seeds_a and seeds_a == seeds_b and len(a) == len(b) == len(seeds_a):
            return [round(x - y, 4) for x, y in zip(a, b)]
    return None


def paired_summary(diffs: list[float]) -> str:
    """A pair list as the tables show it, to 0.001: "+0.015 / +0.000 / -0.002; higher on 1, level on 1
    of 3, mean +0.004" (counted as shown, so a pair shown +0.000 is level, not higher)."""
    shown = [round(d, 3) + 0.0 for d in diffs]  # + 0.0: no "-0.000"
    higher, level = sum(d > 0 for d in shown), sum(d == 0 for d in shown)
    counts = f"higher on {higher}" + (f", level on {level}" if level else "") + f" of {len(diffs)}"
    return " / ".join(f"{d:+.3f}" for d in shown) + f"; {counts}, mean {round(float(np.mean(diffs)), 3) + 0.0:+.3f}"


def chosen_by_validation(res: dict[str, Any]) -> list[str]:
    """Per domain, the relation-KD weight a user would pick (best validation Dice on the training
    source, among the ``WEIGHT_CHOICES`` rows) and its unseen-source row against the baselines."""
    out = []
    for domain, v in res.get("domains", {}).items():
        models, unseen = v["models"], v["unseen_source"]
        options = [n for n in WEIGHT_CHOICES if "val_dice" in models.get(n, {}) and n in unseen]
        if len(options) < 2 or not all(b in unseen for b in ("student_alone", "logit_kd")):
            continue
        best = max(options, key=lambda n: models[n]["val_dice"])
        key = DOMAINS[domain]["unseen_key"]
        x, a, b = unseen[best][key], unseen["student_alone"][key], unseen["logit_kd"][key]
        out.append(
            f"- unseen source {key}, relation KD in the setting chosen by validation Dice ({best}, {models[best]['val_dice']:.3f}): "
            f"{x:.3f} vs student_alone {a:.3f} / logit_kd {b:.3f}: {'met' if x > max(a, b) else '**missed**'}"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--work", type=Path, default=HERE.parent / "runs" / "bench-distill")
    p.add_argument("--teacher-steps", type=int, default=1500)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the training pass (1 when two passes run side by side)")
    p.add_argument("--measure", action="store_true", help="the timing pass over the trained models (run alone)")
    p.add_argument("--report", action="store_true", help="only rewrite results.md from results.json (e.g. after a change to the markdown)")
    p.add_argument("--only", nargs="*", default=list(DOMAINS), choices=list(DOMAINS))
    p.add_argument("--models", nargs="*", default=MODELS, choices=MODELS)
    p.add_argument("--seed", type=int, default=0, help="the splits' and the teachers' seed")
    p.add_argument(
        "--reuse-students", action="store_true", help="score finished student runs of the same steps instead of retraining them (after a code change, do not)"
    )
    p.add_argument("--student-seeds", type=int, nargs="*", default=None, help="train each student once per seed and report the mean (default: --seed only)")
    p.add_argument("--results", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    if not a.data.is_dir():
        print(f"distill.py: data folder {a.data} not found; pass --data", file=sys.stderr)
        return 1
    import torch

    path = a.results / "results.json"

    def save(res: dict[str, Any]) -> dict[str, Any]:
        res = summarise(res)
        a.results.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
        (a.results / "results.md").write_text(markdown(res, a.results), encoding="utf-8")
        return res

    if a.report:
        save(json.loads(path.read_text(encoding="utf-8")))
        return 0
    if a.measure:
        if not path.exists():
            print(f"distill.py: {path} not found; run the training pass first", file=sys.stderr)
            return 1
        torch.set_num_threads(2)
        res = json.loads(path.read_text(encoding="utf-8"))
        measure_all(res, a.data, a.work, res.get("seed", 0), a.only, a.models)
        fresh = json.loads(path.read_text(encoding="utf-8"))  # a training pass of another domain may have written meanwhile
        for domain in a.only:
            if domain in res.get("domains", {}):
                fresh.setdefault("domains", {})[domain] = res["domains"][domain]
        res = fresh
        save(res)
        log(f"wrote {path}")
        return 0
    torch.set_num_threads(a.threads)
    for domain in a.only:
        new = run_domain(domain, a.models, a.data, a.work, a.teacher_steps, a.steps, a.seed, a.student_seeds or [a.seed], a.reuse_students)
        # two passes may run side by side (one domain each): read what the other wrote just before merging
        res = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        if res and (res.get("steps"), res.get("teacher_steps")) != (a.steps, a.teacher_steps):
            print(
                f"distill.py: {path} was made with other settings; move it away or use --steps {res.get('steps')} --teacher-steps {res.get('teacher_steps')}",
                file=sys.stderr,
            )
            return 1
        res.update({"steps": a.steps, "teacher_steps": a.teacher_steps, "seed": a.seed})
        save(merge(res, domain, new))
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
