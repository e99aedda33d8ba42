"""The ``medalloy`` command: a thin layer over the Python API (every subcommand calls one function).

Training is ``medalloy train expert|universal|amalgamate|distill|pretrain``; the old top-level
``distill``, ``amalgamate`` and ``pretrain`` still parse (same flags), say where they moved, and run.
A train flag that is one config field is made from the field (:data:`FIELD_FLAGS`) and reaches the
recipe as a dotted-path ``set`` override; the few that are not stay written out here.

Errors a user can fix (:class:`~medalloy.errors.MedalloyError`) print as one line and exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from importlib import import_module
from pathlib import Path
from typing import Any, Literal

from medalloy.errors import MedalloyError

# data.transforms.AUGMENT_PRESETS' names, spelled out so that the CLI does not import MONAI to build its parser (a test keeps them equal)
AUGMENT_CHOICES = ("default", "strong")


class _Help(argparse.HelpFormatter):
    """Every flag's help ends with its default where the text does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default in (None, False, argparse.SUPPRESS) or "default" in text.lower():
            return text
        return f"{text} (default: %(default)s)"


class _TopHelp(_Help, argparse.RawDescriptionHelpFormatter):
    """The command groups are laid out by hand (the epilog)."""


# `medalloy --help` lists the commands by what they are for
COMMAND_GROUPS = {
    "data": ("data", "plan"),
    "train": ("train", "pipeline", "demo"),
    "predict and score": ("predict", "evaluate"),
    "deploy": ("export",),
    "pretraining tools": ("zeroshot", "caption", "probe", "retrieve"),
}
_COMMAND_HELP: dict[str, str] = {}


def _command(sub: Any, name: str, text: str) -> argparse.ArgumentParser:
    """A top-level command: its one line in the grouped listing and atop its own --help."""
    _COMMAND_HELP[name] = text
    return sub.add_parser(name, description=text.replace("%%", "%").capitalize())


def _grouped_commands() -> str:
    width = max(len(n) for n in _COMMAND_HELP) + 2
    lines = []
    for group, names in COMMAND_GROUPS.items():
        lines.append(f"{group}:")
        lines += [f"  {n:<{width}}{_COMMAND_HELP[n].replace('%%', '%')}" for n in names]
        lines.append("")
    return "commands, by what they are for:\n\n" + "\n".join(lines) + "`medalloy COMMAND --help` describes each command and its flags."


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that may add its arguments when first used (:meth:`later`): a train method's
    flags come from its recipe's config class, whose import (torch, MONAI: seconds) no other command waits for."""

    _later: Callable[[argparse.ArgumentParser], None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def later(self, add: Callable[[argparse.ArgumentParser], None]) -> None:
        self._later = add

    def ready(self) -> _Parser:
        """This parser with all its arguments."""
        if self._later is not None:
            add, self._later = self._later, None
            add(self)
        return self

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self.ready()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self.ready()
        return super().format_usage()

    def format_help(self) -> str:
        self.ready()
        return super().format_help()


def _labels(pairs: Sequence[str] | None) -> dict[str, int] | None:
    if not pairs:
        return None
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise MedalloyError(f"--label '{pair}' is not NAME=VALUE", fix="write e.g. --label polyp=1")
        out[name.strip()] = int(value)
    return out


def cmd_data_check(a: argparse.Namespace) -> int:
    from medalloy.data.check import check_dataset, format_report

    problems = check_dataset(a.dataset, progress=not a.quiet)
    print(format_report(problems, a.dataset))
    return 1 if problems else 0


def cmd_data_import(a: argparse.Namespace) -> int:
    from medalloy.data.importer import import_folders

    ds = import_folders(a.images, a.masks, a.out, source=a.source, labels=_labels(a.label), overwrite=a.overwrite, progress=not a.quiet)
    print(f"{ds.root}: {len(ds.cases)} cases, sources {ds.sources}, labels {ds.spec.labels}")
    return 0


def cmd_data_synth(a: argparse.Namespace) -> int:
    from medalloy.data.synth import generate_collection

    paths = generate_collection(a.out, seed=a.seed, cases_per_source=a.cases, overwrite=a.overwrite, progress=not a.quiet)
    for p in paths:
        print(p)
    return 0


def cmd_data_split(a: argparse.Namespace) -> int:
    from medalloy.data.dataset import RawDataset
    from medalloy.data.splits import kfold_splits, leave_one_source_out, save_splits

    ds = RawDataset(a.dataset)
    splits = leave_one_source_out(ds.cases) if a.loso else kfold_splits(ds.cases, k=a.folds, seed=a.seed)
    out = Path(a.out) if a.out else ds.root / ("splits_loso.json" if a.loso else "splits_final.json")
    save_splits(splits, out, overwrite=a.overwrite)
    print(out)
    return 0


def cmd_plan(a: argparse.Namespace) -> int:
    from medalloy.planning.planner import plan_and_save

    out = Path(a.out) if a.out else Path(a.dataset) / "plan.json"
    kw = {
        k: v
        for k, v in {"max_2d_side": a.max_2d_side, "max_2d_patch": a.max_2d_patch, "base_filters": a.base_filters, "force_dim": a.dim}.items()
        if v is not None
    }
    if a.budget_minutes:
        from medalloy.recipes.step_timing import budget_timing

        kw.update(budget_minutes=a.budget_minutes, **budget_timing(a.device))
    plan = plan_and_save(a.dataset, out, overwrite=a.overwrite, progress=not a.quiet, **kw)
    print(f"{out}: {plan.dim}D, patch {plan.patch_size}, spacing {plan.target_spacing}, batch {plan.batch_size}, filters {plan.network.filters}")
    if plan.budget is not None:
        for c in plan.budget.candidates:
            mark = "*" if c.name == plan.budget.chosen else " "
            print(f"  {mark} {c.name}: patch {c.patch_size}, {c.seconds_per_step:g} s/step, {c.expected_steps} steps, {c.expected_epochs:g} epochs")
    for note in plan.notes:
        print(f"  - {note}")
    return 0


def _say(text: str) -> None:
    """Print once per job: under torchrun only rank 0 reports."""
    if os.environ.get("RANK", "0") == "0":
        print(text)


def cmd_train_expert(a: argparse.Namespace) -> int:
    from medalloy.recipes.expert import train_expert

    res = train_expert(
        a.dataset, a.out, plan=a.plan, config=a.config, set=_overrides(a, "expert"), resume=a.resume, overwrite=a.overwrite, progress=not a.quiet, init=a.init
    )
    best = res.get("best", {}) or {}
    _say(f"{a.out}: {res['steps']} steps in {res['seconds']:.0f} s ({res['images_per_s']:.1f} images/s, {res['precision']}); best val Dice {best.get('value')}")
    return 0


def cmd_train_universal(a: argparse.Namespace) -> int:
    from medalloy.recipes.universal import train_universal

    sets = _overrides(a, "universal", {"patch_size": a.patch})
    res = train_universal(a.datasets, a.out, config=a.config, set=sets, resume=a.resume, overwrite=a.overwrite, progress=not a.quiet)
    best = res.get("best", {}) or {}
    _say(f"{a.out}: {len(res['tasks'])} tasks ({', '.join(res['tasks'])}), {res['steps']} steps in {res['seconds']:.0f} s; best val Dice {best.get('value')}")
    return 0


def cmd_distill(a: argparse.Namespace) -> int:
    from medalloy.recipes.distill import train_distill

    stem = a.stem_depth if a.stem_depth is not None else (1 if a.stem else None)
    sets = _overrides(a, "distill", {"separable": a.separable or None, "stem": stem})
    # the preset by name: train_distill puts it under the YAML's own augment fields, whatever form the YAML gives them
    res = train_distill(
        a.datasets, a.teacher, a.out, config=a.config, set=sets, augment=a.augment, resume=a.resume, overwrite=a.overwrite, progress=not a.quiet
    )  # fmt: skip
    best = res.get("best", {}) or {}
    _say(
        f"{a.out}: student of {res['params']} parameters (teacher {res['teacher_params']}), {res['steps']} steps in {res['seconds']:.0f} s; best val Dice {best.get('value')}"
    )
    return 0


def cmd_amalgamate(a: argparse.Namespace) -> int:
    from medalloy.recipes.amalgamate import train_amalgamate

    foundation = "scratch" if a.foundation in ("swinunetr", "scratch") else a.foundation
    stages = None if a.stages is None else ([] if a.stages == ["none"] else a.stages)
    special = {
        "foundation": foundation if a.foundation else None, "hierarchical": False if a.flat else None, "stages": stages,
        "expert_priors": False if a.no_expert_priors else None,
    }  # fmt: skip
    sets = _overrides(a, "amalgamate", special)
    res = train_amalgamate(a.datasets, a.experts, a.out, config=a.config, set=sets, resume=a.resume, overwrite=a.overwrite, progress=not a.quiet)
    best = res.get("best", {}) or {}
    _say(
        f"{a.out}: {len(res['tasks'])} tasks from {len(res['experts'])} frozen experts ({res['trainable_params']} trainable of {res['params']} parameters), "
        f"{res['steps']} steps in {res['seconds']:.0f} s; best val Dice {best.get('value')}"
    )
    return 0


def _report_column_flags(c: argparse.ArgumentParser, label: str | None = None) -> None:
    """The flags that say how to read an image-report CSV (data.reports.ReportColumns); ``label``: the
    default of --label-column (none: no such flag)."""
    for col in ("image", "findings", "impression"):
        c.add_argument(f"--{col}-column", default=None, help=f"CSV column of the {col} (default '{col}')")
    c.add_argument("--patient-column", default=None, help="CSV column of the patient (default 'patient', may be absent); 'none': every row its own patient")
    if label is not None:
        c.add_argument("--label-column", default=label, help=f"CSV column of the class (default '{label}')")
    c.add_argument("--image-dir", default=None, metavar="DIR", help="folder the image paths are relative to (default: the CSV's folder, then its images/)")
    c.add_argument("--skip-empty", action="store_true", help="skip rows with an empty findings or impression (counted and reported) instead of stopping")


def _report_columns(a: argparse.Namespace) -> dict[str, str]:
    """The ReportColumns fields the flags of :func:`_report_column_flags` name (unnamed ones keep their defaults)."""
    given = {
        "image": a.image_column, "findings": a.findings_column, "impression": a.impression_column, "patient": a.patient_column,
        "label": getattr(a, "label_column", None), "image_dir": a.image_dir,
    }  # fmt: skip
    return {k: v for k, v in given.items() if v is not None}


def cmd_pretrain(a: argparse.Namespace) -> int:
    from medalloy.recipes.pretrain import pretrain

    special = {
        "skip_empty": True if a.skip_empty else None, "text_only_findings": a.text_only_findings_column, "text_only_impression": a.text_only_impression_column,
        **{f"columns.{k}": v for k, v in _report_columns(a).items()},  # the named columns only: the others keep the YAML's (or the default)
    }  # fmt: skip
    sets = _overrides(a, "pretrain", special)
    res = pretrain(
        a.pairs, a.out, text_only=a.text_only, plan=a.plan, config=a.config, set=sets, resume=a.resume, overwrite=a.overwrite, progress=not a.quiet
    )  # fmt: skip
    best = res.get("best", {}) or {}
    _say(
        f"{a.out}: {res['train_pairs']} image-report pairs (+{res['text_only_pairs']} text-only), text encoder {res['text_encoder']}, "
        f"losses {'+'.join(res['losses'])}; {res['steps']} steps in {res['seconds']:.0f} s; best val loss {best.get('value')}"
        + ("; rows skipped: " + ", ".join(f"{n} {why}" for why, n in res["skipped"].items()) if res["skipped"] else "")
    )
    return 0


def cmd_zeroshot(a: argparse.Namespace) -> int:
    from medalloy.radiograph_tasks import zeroshot

    path = zeroshot(a.run, a.images, a.classes.split(","), a.output, prompt=a.prompt, device=a.device, progress=not a.quiet)
    _say(f"{path}: one predicted class per image")
    return 0


def cmd_caption(a: argparse.Namespace) -> int:
    from medalloy.radiograph_tasks import caption

    path = caption(a.run, a.images, a.output, device=a.device, progress=not a.quiet)
    _say(f"{path}: one generated impression per image")
    return 0


def cmd_probe(a: argparse.Namespace) -> int:
    from medalloy.data.reports import ReportColumns
    from medalloy.radiograph_tasks import probe

    columns = ReportColumns.model_validate(_report_columns(a))
    res = probe(
        a.run, a.pairs, a.output, columns=columns, fractions=a.fractions, test_fraction=a.test_fraction, seed=a.seed, skip_empty=a.skip_empty,
        device=a.device, progress=not a.quiet,
    )  # fmt: skip
    floor = res["majority"]
    _say(
        f"{a.output}: linear probe of '{res['label_column']}' ({len(res['classes'])} classes) on {res['train_images']} training images, "
        f"{res['test_images']} held-out images of {len(res['test_patients'])} patients (always '{floor['class']}': accuracy {floor['accuracy']:.3f})"
    )
    for s in res["scores"]:
        _say(f"  {s['fraction'] * 100:g} % of the labels ({s['labels']}): accuracy {s['accuracy']:.3f}, balanced accuracy {s['balanced_accuracy']:.3f}")
    return 0


def cmd_retrieve(a: argparse.Namespace) -> int:
    from medalloy.data.reports import ReportColumns
    from medalloy.radiograph_tasks import retrieve

    columns = ReportColumns.model_validate(_report_columns(a))
    res = retrieve(a.run, a.pairs, a.output, columns=columns, ks=a.k, skip_empty=a.skip_empty, device=a.device, progress=not a.quiet)
    _say(f"{a.output}: {res['pairs_scored']} image-impression pairs ({res['distinct_impressions']} distinct impressions)")
    for way, name in (("image_to_text", "image -> text"), ("text_to_image", "text -> image")):
        _say(f"  {name}: " + ", ".join(f"R@{k} {res[way][f'r{k}']:.3f}" for k in res["ks"]))
    return 0


def _set_flag(c: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE``, which every ``train`` subcommand takes (recipes/config.py reads it)."""
    c.add_argument(
        "--set", action="append", default=None, metavar="KEY=VALUE",
        help="set any config field by its dotted path, VALUE read as YAML (train.lr=1e-3, augment.preset=strong, stages=[enc4]); repeatable; "
        "applied after --config and the other flags, so it wins over both",
    )  # fmt: skip


def _sets(a: argparse.Namespace) -> dict[str, Any] | None:
    """``--set`` as ``{dotted key: value}`` (a malformed one fails here, before any work), None when not given."""
    from medalloy.recipes.config import parse_sets

    return parse_sets(a.set) if a.set else None


# each train method's config class (in medalloy.recipes.<method>) and its fields that get a flag each,
# --NAME for the field's name (train.steps: --steps); the flags that are no one field are written out
# in the method's _*_flags, and every flag reaches the recipe as a dotted-path set override (_overrides)
_RUN_FIELDS = ("train.steps", "train.seed", "train.precision", "train.device")
FIELD_FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "expert": ("ExpertConfig", ("fold", *_RUN_FIELDS)),
    "universal": ("UniversalConfig", ("fold", "dim", "datasets_per_step", "priors", "batch_size", *_RUN_FIELDS)),
    "distill": ("DistillConfig", ("student", "upsample", "losses", "fold", "batch_size", *_RUN_FIELDS)),
    "amalgamate": ("AmalgamateConfig", ("feature_size", "decoder", "datasets_per_step", "fold", "batch_size", *_RUN_FIELDS)),
    "pretrain": ("PretrainConfig", ("image_size", "text_encoder", "losses", "summarize_steps", "token_scope", "val_fraction", "batch_size", *_RUN_FIELDS)),
}


def config_class(method: str) -> type:
    """The config class of a train method (importing its recipe: torch, MONAI)."""
    return getattr(import_module(f"medalloy.recipes.{method}"), FIELD_FLAGS[method][0])


def _flag_kind(annotation: Any) -> dict[str, Any]:
    """argparse's ``type``, ``choices`` and ``nargs`` for a field of type ``annotation`` (a flag given is a value: None is left out)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        kinds = [arg for arg in args if arg is not type(None)]
        return _flag_kind(kinds[0]) if len(kinds) == 1 else {}  # str | int: the text as typed, which the config reads
    if origin is list:
        return {"nargs": "+", **_flag_kind(args[0])}
    if origin is Literal:
        return {"type": type(args[0]), "choices": args}
    if annotation in (int, float, str):
        return {"type": annotation}
    raise TypeError(f"no flag for a config field of type {annotation}")


def _field_help(description: str | None, default: Any) -> str:
    """A field flag's help: the field's description and the method's default (a None default is for the description to explain)."""
    shown = "" if default is None else f" (default: {' '.join(map(str, default)) if isinstance(default, list) else default})"
    return f"{description or ''}{shown}".strip().replace("%", "%%")


def _field_flags(c: argparse.ArgumentParser, method: str) -> None:
    """The flags of ``method`` that are one config field each (:data:`FIELD_FLAGS`), each with the field's dotted path as dest."""
    from medalloy.recipes.config import field_at

    cls = config_class(method)
    for path in FIELD_FLAGS[method][1]:
        info, default = field_at(cls, path)
        name = path.rsplit(".", 1)[-1]
        kind = _flag_kind(info.annotation)
        metavar = None if "choices" in kind else name.upper()
        c.add_argument(f"--{name.replace('_', '-')}", dest=path, default=None, metavar=metavar, help=_field_help(info.description, default), **kind)


def _run_flags(c: argparse.ArgumentParser, method: str, what: str) -> None:
    """The training flags every train method has: --config, its field flags, --budget-minutes, --resume, --overwrite, --set."""
    c.add_argument("--config", default=None, help=f"YAML with {what} settings")
    _field_flags(c, method)
    planned = "; without --plan, also the finest plan expected to converge in it (plan.json says why; plan_for_budget: false keeps the planner's own)"
    c.add_argument(
        "--budget-minutes", type=float, default=None, help="train as many steps as fit this wall-clock time" + (planned if method == "expert" else "")
    )
    c.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
    c.add_argument("--overwrite", action="store_true", help="replace a run already in --out (default: refuse, or --resume it)")
    _set_flag(c)


def _overrides(a: argparse.Namespace, method: str, special: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """What the flags of ``method`` set, as the recipe's ``set`` override (dotted path -> value): its field
    flags, --budget-minutes and ``special`` (the paths of its flags that are no one field), each where given;
    then --set, which wins. None when nothing is set."""
    given = {path: getattr(a, path) for path in FIELD_FLAGS[method][1]}
    given.update({"train.time_budget_minutes": a.budget_minutes, **(special or {})})
    sets = {k: v for k, v in given.items() if v is not None}
    sets.update(_sets(a) or {})
    return sets or None


def _expert_flags(c: argparse.ArgumentParser) -> None:
    """The flags of ``train expert``."""
    c.add_argument("dataset")
    c.add_argument("--out", required=True, help="the run folder to write")
    c.add_argument("--plan", default=None, help="plan JSON (default: plan the dataset now)")
    c.add_argument("--init", default=None, metavar="RUN", help="start the encoder from a pretrain (or expert) run; without --plan the plan takes its network")
    _run_flags(c, "expert", "train/augment")
    c.set_defaults(fn=cmd_train_expert)


def _universal_flags(c: argparse.ArgumentParser) -> None:
    """The flags of ``train universal``."""
    c.add_argument("datasets", nargs="+")
    c.add_argument("--out", required=True, help="the run folder to write")
    c.add_argument(
        "--patch", type=int, default=None,
        help="one square (cube) patch side for every dataset, datasets mixed in each batch "
        "(default: each dataset's own plan patch and batch, --datasets-per-step of them a step)",
    )  # fmt: skip
    _run_flags(c, "universal", "train/augment/model")
    c.set_defaults(fn=cmd_train_universal)


def _distill_flags(c: argparse.ArgumentParser) -> None:
    """The flags of ``train distill`` (and of its old name, ``distill``)."""
    c.add_argument("datasets", nargs="+", metavar="DATASET")
    c.add_argument("--teacher", required=True, help="run folder or checkpoint of any medalloy model")
    c.add_argument("--out", required=True, help="the run folder to write")
    c.add_argument("--separable", action="store_true", help="depthwise-separable convolutions in the student (wider filters within the same budget)")
    c.add_argument(
        "--stem",
        action="store_true",
        help="a stem of one: the student starts at the plan's first pooling, logits interpolated back (default: recipes/students.default_stem, a stem of two where the patch allows it)",
    )
    c.add_argument(
        "--stem-depth",
        type=int,
        default=None,
        metavar="N",
        help="a stem that drops the N finest stages (0: a full-resolution student; 2: also folds 2x2 pixels into channels; --stem is 1; default: the deepest up to 2 that leaves >= 32 px at the start)",
    )
    c.add_argument(
        "--augment",
        default=None,
        choices=AUGMENT_CHOICES,
        help="training augmentation preset (strong: more often and wider, intensity above all; it lifted every chest X-ray student on an unseen centre, docs/methods/distillation.md)",
    )
    _run_flags(c, "distill", "train/augment/distillation")
    c.set_defaults(fn=cmd_distill)


def _amalgamate_flags(c: argparse.ArgumentParser) -> None:
    """The flags of ``train amalgamate`` (and of its old name, ``amalgamate``)."""
    c.add_argument("datasets", nargs="+", metavar="DATASET")
    c.add_argument(
        "--experts", nargs="+", action="extend", default=[], metavar="RUN",
        help="medalloy expert runs or trained nnU-Net v2 model folders (.../nnUNetTrainer__nnUNetPlans__2d[/fold_0]); none: the foundation alone",
    )  # fmt: skip
    c.add_argument("--out", required=True, help="the run folder to write")
    c.add_argument(
        "--foundation", default=None, help="swinunetr (from scratch, default), a weights file (.safetensors, MONAI's model_swinvit.pt) or an amalgamate run"
    )
    c.add_argument("--flat", action="store_true", help="ablation: concatenate + 1x1 conv instead of hierarchical attention")
    c.add_argument("--stages", nargs="+", default=None, help="foundation stages to amalgamate at (default enc4 bottleneck; 'none': the foundation alone)")
    c.add_argument(
        "--no-expert-priors",
        action="store_true",
        help="ablation: the decoder alone answers (default: each task's own experts' log-odds + the decoder's correction)",
    )
    _run_flags(c, "amalgamate", "train/augment/amalgamation")
    c.set_defaults(fn=cmd_amalgamate)


def _pretrain_flags(c: argparse.ArgumentParser) -> None:
    """The flags of ``train pretrain`` (and of its old name, ``pretrain``)."""
    c.add_argument("--pairs", required=True, metavar="CSV", help="image path, findings, impression (and patient) per row")
    c.add_argument("--text-only", default=None, metavar="CSV", help="findings -> impression reports without images (summarization stage)")
    c.add_argument("--out", required=True, help="the run folder to write")
    c.add_argument("--plan", default=None, help="plan JSON of a 2D X-ray dataset (default: the planner's network for --image-size)")
    _report_column_flags(c)
    c.add_argument("--text-only-findings-column", default=None, help="--text-only CSV column of the findings (default 'findings')")
    c.add_argument("--text-only-impression-column", default=None, help="--text-only CSV column of the impression (default 'impression')")
    _run_flags(c, "pretrain", "train/augment/pretraining")
    c.set_defaults(fn=cmd_pretrain)


# train method -> (help, flags), in the order of `medalloy train --help`
TRAIN_METHODS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "expert": ("one nnU-Net-style U-Net for one dataset", _expert_flags),
    "universal": ("one Hermes model for the tasks of several datasets (task and modality priors)", _universal_flags),
    "distill": ("distil a trained model into a lightweight student (relation-based KD)", _distill_flags),
    "amalgamate": ("merge frozen experts (medalloy or nnU-Net v2) into one SwinUNETR model of all tasks (KA2ER)", _amalgamate_flags),
    "pretrain": ("pretrain an X-ray encoder on image-report pairs (HybridMED); start experts from it with train expert --init", _pretrain_flags),
}
# train methods that were top-level commands: the old names stay as hidden aliases
MOVED = ("distill", "amalgamate", "pretrain")


def cmd_export(a: argparse.Namespace) -> int:
    from medalloy.export import export_onnx

    meta = export_onnx(
        a.run, a.out, dataset=a.dataset, tasks=a.task, modality=a.modality, checkpoint=a.checkpoint, opset=a.opset, overwrite=a.overwrite,
        quantize=a.quantize, calibration=a.calibration,
    )  # fmt: skip
    what = f"tasks {', '.join(meta['tasks'])}" if meta["tasks"] else f"labels {', '.join(meta['labels'])}"
    q = meta.get("quantization")
    how = f", int8 ({q['mode']}{', ' + str(q['samples']) + ' calibration patches' if q['samples'] else ''})" if q else ""
    print(f"{a.out}: ONNX opset {meta['opset']}{how}, input {meta['input']['shape']}, {what}; sidecar {a.out}.json")
    return 0


def _predict_onnx(a: argparse.Namespace) -> int:
    """An exported graph through the torch-free runtime (what a deployment install has)."""
    from medalloy.runtime import predict_folder

    for flag, given in (("--task", a.task), ("--dataset", a.dataset), ("--modality", a.modality)):
        if given:
            raise MedalloyError(
                f"an ONNX graph predicts what it was exported for; {flag} does not apply",
                a.run,
                "export the run bound to those tasks, or predict the run itself",
            )
    files = predict_folder(
        a.run,
        a.input,
        a.output,
        tta=a.tta,
        overwrite=a.overwrite,
        progress=not a.quiet,
        native_size=a.native_size,
        say=lambda line: print(f"{a.output}: {line}"),
    )
    print(f"{a.output}: {len(files)} predictions (ONNX Runtime)")
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    if str(a.run).endswith(".onnx") and not a.probabilities:
        return _predict_onnx(a)
    from medalloy.predict import predict_folder, predict_tasks

    if a.task:
        files, note = predict_tasks(
            a.run, a.input, a.output, a.task, dataset=a.dataset, modality=a.modality, tta=a.tta, checkpoint=a.checkpoint,
            device=a.device, precision=a.precision, overwrite=a.overwrite, progress=not a.quiet, native_size=a.native_size,
        )  # fmt: skip
        print(f"{a.output}: {len(files)} masks ({note})")
        return 0
    if a.modality:
        raise MedalloyError("--modality chooses the preprocessing for --task", fix="add --task T, or use --dataset")
    files = predict_folder(
        a.run, a.input, a.output, tta=a.tta, probabilities=a.probabilities, checkpoint=a.checkpoint,
        device=a.device, precision=a.precision, overwrite=a.overwrite, progress=not a.quiet, dataset=a.dataset,
        native_size=a.native_size, say=lambda line: print(f"{a.output}: {line}"),
    )  # fmt: skip
    print(f"{a.output}: {len(files)} predictions")
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from medalloy.evaluation import evaluate_folders

    res = evaluate_folders(a.pred, a.gt, dataset=a.dataset, out_dir=a.out, overwrite=a.overwrite, progress=not a.quiet)
    out = Path(a.out) if a.out else Path(a.pred) / "evaluation"
    print((out / "summary.md").read_text(encoding="utf-8") if (out / "summary.md").exists() else json.dumps(res.get("summary", {}), indent=1))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from medalloy.demo import run_demo

    report = run_demo(a.out, overwrite=a.overwrite, steps=a.steps, seed=a.seed, progress=not a.quiet)
    print(f"report: {report}")
    return 0


def cmd_pipeline(a: argparse.Namespace) -> int:
    from medalloy import pipeline

    if a.schema:
        print(json.dumps(pipeline.json_schema(), indent=1))
        return 0
    if a.config is None or a.out is None:
        raise MedalloyError("give the pipeline file and --out", fix="medalloy pipeline PIPELINE.yaml --out RUN (or --schema)")
    variables = dict(_key_value(v, "--var") for v in a.var)
    result = pipeline.run(a.config, a.out, until=a.until, only=a.only, dry_run=a.dry_run, progress=not a.quiet, variables=variables, log=True)
    if not a.dry_run and result.report is not None:
        print(f"report: {result.report}")
    return 0


def _key_value(text: str, flag: str) -> tuple[str, str]:
    if "=" not in text:
        raise MedalloyError(f"{flag} {text}: not NAME=VALUE", fix=f"write {flag} DATA=/path/to/data")
    k, v = text.split("=", 1)
    return k.strip(), v


def build_parser() -> _Parser:
    from medalloy import __version__

    p = _Parser(
        prog="medalloy",
        description="Universal medical image segmentation from many datasets and models.",
        formatter_class=_TopHelp,
        usage="medalloy [-h] [--version] [--threads THREADS] [-q] COMMAND ...",
    )
    p.add_argument("--version", action="version", version=f"medalloy {__version__}")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help=argparse.SUPPRESS)  # listed by group in the epilog

    data = _command(sub, "data", "datasets: check, import, synthesise, split").add_subparsers(dest="data_command", required=True)
    c = data.add_parser("check", help="list every problem of an nnU-Net raw dataset (exit 1 if any)")
    c.add_argument("dataset")
    c.set_defaults(fn=cmd_data_check)
    c = data.add_parser("import-folders", help="images/ + masks/ folders into an nnU-Net raw dataset (PNG)")
    c.add_argument("--images", required=True, help="folder of images (PNG, JPEG, BMP or TIFF)")
    c.add_argument("--masks", required=True, help="folder of masks with the same file stems (pixel value = label value)")
    c.add_argument("--out", required=True, help="DatasetNNN_Name folder (created, or extended with a new source)")
    c.add_argument("--source", required=True, help="centre/scanner/site name of these cases")
    c.add_argument("--label", action="append", metavar="NAME=VALUE", help="label map entry (repeatable); default foreground=1")
    c.add_argument("--overwrite", action="store_true", help="replace cases of this source already in --out")
    c.set_defaults(fn=cmd_data_import)
    c = data.add_parser("synth", help="write the built-in synthetic multi-site collection")
    c.add_argument("--out", required=True, help="folder for the four Dataset9NN_Synth* datasets")
    c.add_argument("--seed", type=int, default=0, help="the images' seed (the same seed, the same data)")
    c.add_argument("--cases", type=int, default=10, help="training cases per source")
    c.add_argument("--overwrite", action="store_true", help="replace datasets already in --out")
    c.set_defaults(fn=cmd_data_synth)
    c = data.add_parser("split", help="write k-fold (by patient when known) or leave-one-source-out splits")
    c.add_argument("dataset")
    c.add_argument("--folds", type=int, default=5, help="number of folds")
    c.add_argument("--seed", type=int, default=0, help="the shuffle of patients (groups) before they are dealt to folds")
    c.add_argument("--loso", action="store_true", help="leave-one-source-out instead of k-fold")
    c.add_argument("--out", default=None, help="JSON to write (default: DATASET/splits_final.json, as nnU-Net; splits_loso.json with --loso)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing splits file")
    c.set_defaults(fn=cmd_data_split)

    c = _command(sub, "plan", "fingerprint a dataset and write an editable plan JSON")
    c.add_argument("dataset")
    c.add_argument("--out", default=None, help="default DATASET/plan.json")
    c.add_argument("--dim", type=int, choices=(2, 3), default=None, help="force 2D or 3D")
    c.add_argument("--max-2d-side", type=int, default=None, help="2D: coarsen the spacing so the median image side fits (default 256)")
    c.add_argument(
        "--max-2d-patch", type=int, default=None,
        help="2D: cap the patch side; larger images are cropped in training, tiled in inference (cheaper steps, less context: changes how the expert fares on other sources, either way; measure it there)",
    )  # fmt: skip
    c.add_argument(
        "--budget-minutes", type=float, default=None,
        help="choose the finest resolution and width expected to converge in this training time, from step times measured here (cached per machine; plan.json says why); without it, the planner's rules alone",
    )  # fmt: skip
    c.add_argument("--device", default="auto", help="with --budget-minutes: where step times are measured (cpu, cuda, cuda:N or auto)")
    c.add_argument(
        "--base-filters", type=int, default=None, help="filters of the first stage, doubled per stage up to the planner's cap (default: the planner's 16)"
    )
    c.add_argument("--overwrite", action="store_true", help="replace an existing plan file")
    c.set_defaults(fn=cmd_plan)

    train = _command(sub, "train", "train a model").add_subparsers(dest="method", required=True)
    for name, (text, add_flags) in TRAIN_METHODS.items():
        train.add_parser(name, help=text).later(add_flags)
        if name in MOVED:
            alias = sub.add_parser(name)  # no help: out of the command list (and out of the metavar below)
            alias.later(add_flags)
            alias.set_defaults(moved=name)

    c = _command(sub, "predict", "segment a folder of images with a trained run")
    c.add_argument("run", help="run folder, .safetensors checkpoint or exported .onnx graph (run by ONNX Runtime)")
    c.add_argument("--input", required=True, help="folder of images (nnU-Net CASE_0000.nii.gz / PNG / JPEG; a DICOM series per subfolder)")
    c.add_argument("--output", required=True, help="folder for the label maps (same names and geometry as the inputs)")
    c.add_argument("--tta", action="store_true", help="average over mirrored inputs")
    c.add_argument("--probabilities", action="store_true", help="also write CASE.npz with class probabilities")
    c.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which checkpoint of a run folder")
    c.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    c.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 where the device computes it fast")
    c.add_argument("--dataset", default=None, help="universal models: the training dataset (name, folder name or path) whose tasks and preprocessing apply")
    c.add_argument(
        "--task",
        action="append",
        default=None,
        metavar="T",
        help="universal models: one binary mask per task T (repeatable), each at its own 0.5 threshold, in OUTPUT/T/; without --dataset, the preprocessing of the training dataset that annotates the first T (of --modality, when given) whose typical image size is closest to the inputs', named in one line with why",
    )
    c.add_argument("--modality", default=None, help="with --task and no --dataset: use a training dataset of this modality")
    c.add_argument(
        "--native-size",
        action="store_true",
        help="keep PNG/JPEG inputs at their own pixel size (default: where their median size is more than 1.25x off the training data's typical size, each is resampled to it)",
    )
    c.add_argument("--overwrite", action="store_true", help="replace predictions already in --output")
    c.set_defaults(fn=cmd_predict)

    c = _command(sub, "zeroshot", "classify radiographs by text prompts with a pretrain run")
    c.add_argument("run", help="pretrain run folder or checkpoint")
    c.add_argument("--images", required=True, help="folder of radiographs")
    c.add_argument("--classes", required=True, help='comma-separated class names, e.g. "COVID-19,No Finding"')
    c.add_argument("--prompt", default="{}", help="text for a class, {} replaced by its name (default: the name itself)")
    c.add_argument("--output", default="zeroshot.csv", help="CSV to write (default zeroshot.csv)")
    c.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    c.set_defaults(fn=cmd_zeroshot)

    c = _command(sub, "caption", "generate an impression for each radiograph with a pretrain run")
    c.add_argument("run", help="pretrain run folder or checkpoint")
    c.add_argument("--images", required=True, help="folder of radiographs")
    c.add_argument("--output", default="captions.csv", help="CSV to write (default captions.csv)")
    c.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    c.set_defaults(fn=cmd_caption)

    c = _command(sub, "probe", "linear probe of a pretrain run's frozen encoder with 1, 10, 100 %% of the labels (patients held out)")
    c.add_argument("run", help="pretrain run folder or checkpoint")
    c.add_argument("--pairs", required=True, metavar="CSV", help="image path, patient, label (and findings, impression) per row")
    c.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0], metavar="F", help="shares of the training labels (default 0.01 0.1 1.0)")
    c.add_argument("--test-fraction", type=float, default=0.25, help="share of the patients held out for scoring (default 0.25)")
    c.add_argument("--seed", type=int, default=0, help="which patients are held out, which labels are kept")
    _report_column_flags(c, label="finding")
    c.add_argument("--output", default="probe.json", help="JSON to write (default probe.json)")
    c.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    c.set_defaults(fn=cmd_probe)

    c = _command(sub, "retrieve", "image <-> impression retrieval Recall@k with a pretrain run")
    c.add_argument("run", help="pretrain run folder or checkpoint")
    c.add_argument("--pairs", required=True, metavar="CSV", help="image path, findings, impression (and patient) per row; score pairs the run did not train on")
    c.add_argument("--k", type=int, nargs="+", default=[1, 5, 10], help="Recall@k for each k (default 1 5 10)")
    _report_column_flags(c)
    c.add_argument("--output", default="retrieval.json", help="JSON to write (default retrieval.json)")
    c.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    c.set_defaults(fn=cmd_retrieve)

    c = _command(sub, "export", "a trained model as an ONNX graph and its JSON sidecar, for ONNX Runtime")
    c.add_argument("run", help="run folder, .safetensors checkpoint or trained nnU-Net v2 model folder")
    c.add_argument("--format", choices=("onnx",), default="onnx", help="the exported format")
    c.add_argument("--out", required=True, help="MODEL.onnx (the sidecar MODEL.onnx.json is written beside it)")
    c.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which checkpoint of a run folder")
    c.add_argument("--dataset", default=None, help="universal models: export bound to this training dataset's tasks and preprocessing")
    c.add_argument("--task", action="append", default=None, metavar="T", help="universal models: export bound to these tasks (one sigmoid map each)")
    c.add_argument("--modality", default=None, help="with --task and no --dataset: the preprocessing of a training dataset of this modality")
    c.add_argument("--opset", type=int, default=18, help="ONNX opset (17 or later)")
    c.add_argument(
        "--quantize", choices=("int8",), default=None, help="int8 graph through ONNX Runtime: static with --calibration, else dynamic (weights only)"
    )
    c.add_argument(
        "--calibration",
        default=None,
        metavar="DIR",
        help="with --quantize: images (as for predict --input, e.g. DATASET/imagesTr) whose activation ranges calibrate int8",
    )
    c.add_argument("--overwrite", action="store_true", help="replace an existing graph and sidecar")
    c.set_defaults(fn=cmd_export)

    c = _command(sub, "evaluate", "Dice, HD95 and surface Dice of predictions against ground truth")
    c.add_argument("--pred", required=True, help="folder of predicted label maps")
    c.add_argument("--gt", required=True, help="folder of ground-truth label maps (same file names)")
    c.add_argument("--dataset", default=None, help="dataset folder, for labels, sources and images in overlays")
    c.add_argument("--out", default=None, help="default PRED/evaluation")
    c.add_argument("--overwrite", action="store_true", help="replace an existing evaluation folder")
    c.set_defaults(fn=cmd_evaluate)

    c = _command(sub, "pipeline", "datasets -> experts -> universal -> amalgamated -> student -> ONNX -> report, from one YAML")
    c.add_argument("config", nargs="?", default=None, help="the pipeline file (examples/demo.yaml)")
    c.add_argument("--out", default=None, help="the run folder; a run started again in it reuses the stages that finished")
    c.add_argument("--until", default=None, metavar="STAGE", help="stop after this stage")
    c.add_argument("--only", nargs="+", default=None, metavar="STAGE", help="run only these stages (what they read must have finished)")
    c.add_argument("--dry-run", action="store_true", help="print what would run, what is reused, budgets and inputs; write nothing")
    c.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="a ${NAME} of the file (default: the environment)")
    c.add_argument("--schema", action="store_true", help="print the pipeline file's JSON schema and exit")
    c.set_defaults(fn=cmd_pipeline)

    c = _command(sub, "demo", "the demo pipeline (examples/demo.yaml) on built-in synthetic data")
    c.add_argument("--out", default="runs/demo", help="the run folder")
    c.add_argument("--steps", type=int, default=None, help="every training stage's steps (a quick look; default: the demo's own)")
    c.add_argument("--seed", type=int, default=0, help="every stage's seed")
    c.add_argument("--overwrite", action="store_true", help="start the run folder afresh (default: reuse what finished)")
    c.set_defaults(fn=cmd_demo)
    assert sorted(n for g in COMMAND_GROUPS.values() for n in g) == sorted(_COMMAND_HELP), "every command in one group"
    p.epilog = _grouped_commands()
    return p


# what `pip install medalloy` (deployment) leaves out and `medalloy[train]` adds
TRAINING_STACK = ("torch", "monai", "safetensors", "einops", "matplotlib", "scipy", "tokenizers", "sacrebleu", "rouge_score", "markdown")


def _needs_training_stack(exc: ModuleNotFoundError) -> int:
    """A module of the `train` extra is missing: one line saying how to install it (others propagate)."""
    if (exc.name or "").split(".")[0] not in TRAINING_STACK:
        raise exc
    print(
        f"medalloy: error: this command needs the training stack ({exc.name} is not installed); "
        'fix: pip install torch, then pip install "medalloy[train]" (an exported .onnx predicts without it)',
        file=sys.stderr,
    )
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)  # a train command's flags come from its recipe's config, which needs torch
    except ModuleNotFoundError as exc:
        return _needs_training_stack(exc)
    if getattr(args, "moved", None) and os.environ.get("RANK", "0") == "0":
        print(f"medalloy: 'medalloy {args.moved}' is now 'medalloy train {args.moved}'; the old name will go in a later release", file=sys.stderr)
    try:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        return int(args.fn(args) or 0)
    except ModuleNotFoundError as exc:
        return _needs_training_stack(exc)
    except MedalloyError as exc:
        if not getattr(exc, "from_main", False):  # under torchrun, rank 0 has printed it already
            print(f"medalloy: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("medalloy: interrupted (a training run continues with --resume)", file=sys.stderr)
        return 130
    finally:
        if "torch.distributed" in sys.modules:
            from medalloy.engine.distributed import cleanup

            cleanup()


if __name__ == "__main__":
    sys.exit(main())
