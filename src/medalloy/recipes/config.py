"""Recipe configs: a YAML file (optional) plus overrides, validated by pydantic.

A named override is a field of the config (``fold=1``) or of its ``train`` section (``steps=5``),
by name. The reserved override ``set`` (``--set KEY=VALUE`` on the command line; every flag of a
``train`` subcommand arrives this way too) changes any field by its dotted path, after the YAML and
the named overrides (so it wins over both)."""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo

from medalloy.data.transforms import AugmentConfig
from medalloy.engine.trainer import TrainConfig
from medalloy.errors import MedalloyError
from medalloy.planning.multi_dataset import PlanOptions

C = TypeVar("C", bound=BaseModel)

# the override that holds dotted-path settings (``{"train.lr": 1e-3}`` or ``["train.lr=1e-3"]``)
SET_KEY = "set"
# YAML 1.1 (PyYAML) reads 1e-3 as a string; a command line means the number
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class SegmentationConfig(BaseModel):
    """What every segmentation recipe's config has; a recipe redeclares a field whose default is its own."""

    model_config = ConfigDict(extra="forbid")

    train: TrainConfig = Field(default_factory=TrainConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    fold: int = Field(0, description="fold of each dataset's split (-1: train on all)")
    folds: int = 5
    max_val_cases: int = Field(16, ge=0)  # per dataset
    batch_size: int | None = Field(None, ge=1, description="patches per step (default: the plan's)")


class MultiDatasetConfig(SegmentationConfig):
    """What the recipes of one network on several datasets add: how each dataset is planned, how
    its tasks are named and how often each is drawn."""

    max_val_cases: int = Field(8, ge=0)  # per dataset
    dim: Literal[2, 3] = Field(2, description="2 (volumes sliced) or 3 (volumes, sliding-window prediction)")
    max_2d_side: int = Field(256, ge=16)  # per dataset: coarsen the spacing so the median image fits
    plan_options: dict[str, PlanOptions] = Field(default_factory=dict)  # dataset name -> its planner settings
    base_filters: int = Field(16, ge=1)
    max_filters: int = Field(256, ge=1)
    prior_probability: float | None = Field(0.01, gt=0.0, lt=1.0)  # task logits start at logit(p): "mostly absent" (None: at 0, the paper's)
    class_loss: Literal["exclusive", "bce"] = "exclusive"  # a dataset's labels compete (softmax, background logit 0), or the paper's per-task BCE
    dataset_weighting: Literal["sqrt", "size", "uniform"] = "sqrt"
    datasets_per_step: int = Field(
        2, ge=1, description="own-patch batches of this many distinct datasets averaged in each optimizer step (docs/methods/hermes.md)"
    )
    task_names: dict[str, str] = Field(default_factory=dict)  # "Dataset:label" or "label" -> task name


def override_names(cls: type[BaseModel]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The named overrides ``cls`` takes: its own fields but ``train``, then the fields of its ``train``
    section (a name in both would be the top level's)."""
    top = tuple(k for k in cls.model_fields if k != "train")
    train, _ = _models_in(cls.model_fields["train"].annotation)
    return top, tuple(k for k in (train.model_fields if train else ()) if k not in top)


def field_at(cls: type[BaseModel], dotted: str) -> tuple[FieldInfo, Any]:
    """The field of ``cls`` at ``dotted`` ("train.steps") and its default there, ``cls()``'s (a recipe's own train defaults)."""
    model: type[BaseModel] | None = cls
    value: Any = cls()
    for part in dotted.split("."):
        if model is None or part not in model.model_fields:
            raise KeyError(f"{cls.__name__} has no field {dotted}")
        info = model.model_fields[part]
        value = getattr(value, part)
        model, _ = _models_in(info.annotation)
    return info, value


def load_recipe_config(cls: type[C], path: str | Path | BaseModel | None, overrides: dict[str, Any]) -> C:
    """``cls`` from the YAML at ``path`` (if any; or a ``cls`` instance, left unchanged) with
    ``overrides`` applied (:func:`override_names`): a ``train`` field's name goes to ``train``
    (whose defaults are ``cls()``'s), a top-level field's to the top level; None means unset.
    Last, ``overrides["set"]`` (see :func:`parse_sets`) sets any field by its dotted path
    (``{"train.lr": 1e-3, "augment.preset": "strong"}``), over both the YAML and the named
    overrides. Always a new object."""
    top_keys, train_keys = override_names(cls)
    unknown = sorted(k for k, v in overrides.items() if v is not None and k not in top_keys and k not in train_keys and k != SET_KEY)
    if unknown:
        near = difflib.get_close_matches(unknown[0], top_keys + train_keys, n=1)
        nested = f"or set a nested one by {SET_KEY}={{'dotted.key': value}}"
        fix = f"use {near[0] + ' or ' if near else ''}another field of {cls.__name__} or of its train section, {nested}"
        raise MedalloyError(f"unknown setting(s) {', '.join(unknown)} for {cls.__name__}", fix=fix)
    raw: dict[str, Any] = {}
    if isinstance(path, cls):
        raw, path = path.model_dump(mode="json"), None
    elif isinstance(path, BaseModel):
        raise MedalloyError(f"config is a {type(path).__name__}, not a {cls.__name__}", fix=f"pass a {cls.__name__} or the path of a YAML file")
    if path is not None:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise MedalloyError("config not found", path, "give the path of a YAML file") from None
        except yaml.YAMLError as exc:
            raise MedalloyError(f"config is not valid YAML ({str(exc).splitlines()[0]})", path, "fix the syntax") from None
        if not isinstance(raw, dict):
            raise MedalloyError("config is not a YAML mapping", path, "write 'key: value' lines (train:, augment:, ...)")
    train = {**cls().train.model_dump(), **dict(raw.get("train") or {})}
    train.update({k: overrides[k] for k in train_keys if overrides.get(k) is not None})
    raw["train"] = train
    for k in top_keys:
        if overrides.get(k) is None:
            continue
        both_mappings = isinstance(overrides[k], dict) and isinstance(raw.get(k), dict)
        # a mapping changes only the fields it names (e.g. a preset under the YAML's own fields of that section)
        raw[k] = {**raw[k], **overrides[k]} if both_mappings else overrides[k]
    for key, value in parse_sets(overrides.get(SET_KEY)).items():
        _set_path(cls, raw, key, value, path or "config")
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise MedalloyError(first_error(exc), path or "config", "fix the value") from None


def first_error(exc: ValidationError) -> str:
    """A pydantic error in one line: ``config field 'train.lr': <message>`` (its first error)."""
    err = exc.errors()[0]
    return f"config field '{'.'.join(str(x) for x in err['loc'])}': {err['msg']}"


def parse_sets(sets: Mapping[str, Any] | Iterable[str] | None) -> dict[str, Any]:
    """``{"dotted.key": value}`` from a mapping (values as given) or ``KEY=VALUE`` strings, each
    VALUE read as YAML (``1e-3``, ``true``, ``null``, ``[enc4]``); a later KEY wins."""
    if sets is None:
        return {}
    if isinstance(sets, Mapping):
        return dict(sets)
    if isinstance(sets, str):
        sets = [sets]
    out: dict[str, Any] = {}
    for item in sets:
        key, sep, text = str(item).partition("=")
        if not sep or not key.strip():
            raise MedalloyError(f"--set '{item}' is not KEY=VALUE", fix="write e.g. --set train.lr=1e-3")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            why = str(exc).splitlines()[0]
            raise MedalloyError(f"--set '{item}': the value is not valid YAML ({why})", fix="quote it, e.g. --set 'key=\"text\"'") from None
        out[key.strip()] = float(text) if isinstance(value, str) and _FLOAT.fullmatch(text.strip()) else value  # a quoted '1e-3' stays text
    return out


def _models_in(annotation: Any) -> tuple[type[BaseModel] | None, Any]:
    """The pydantic model a field holds (``X``, ``X | None``), or the value type of a ``dict[str, V]`` (else ``(None, None)``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, None
    origin = typing.get_origin(annotation)
    if origin is dict:
        return None, typing.get_args(annotation)[1]
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            model, value = _models_in(arg)
            if model is not None or value is not None:
                return model, value
    return None, None


def _accepts(model: type[BaseModel], key: str, value: Any) -> bool:
    """Whether ``model`` takes ``key`` though it is no field (an input its validator reads, as AugmentConfig's ``preset``)."""
    try:
        model.model_validate({key: value})
    except ValidationError as exc:
        return not any(e["type"] == "extra_forbidden" and tuple(e["loc"]) == (key,) for e in exc.errors())
    return True


def _set_path(cls: type[BaseModel], raw: dict[str, Any], dotted: str, value: Any, where: str | Path) -> None:
    """``raw[a][b][c] = value`` for ``dotted`` "a.b.c", each part checked against ``cls``'s fields;
    a section given as a non-mapping (``augment: strong``) is expanded by its model first (a wrong
    one is an error of ``where``, the config it came from)."""
    parts = dotted.split(".")
    model: type[BaseModel] | None = cls
    free: Any = None  # the value type under a dict[str, V] field: any key
    node = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if model is not None:
            if part not in model.model_fields and not (last and _accepts(model, part, value)):
                owner = ".".join([cls.__name__, *parts[:i]])
                raise MedalloyError(f"--set {dotted}: {owner} has no field '{part}'", fix=f"use one of {', '.join(model.model_fields)}")
            annotation = model.model_fields[part].annotation if part in model.model_fields else None
        elif free is None and i > 0:
            raise MedalloyError(f"--set {dotted}: '{'.'.join(parts[:i])}' is a value, not a section", fix=f"set it whole: --set {'.'.join(parts[:i])}=VALUE")
        else:
            annotation = free
        if last:
            node[part] = value
            return
        model, free = _models_in(annotation)
        child = node.get(part)
        if isinstance(child, BaseModel):
            child = child.model_dump(mode="json")
        elif child is not None and not isinstance(child, dict) and model is not None:
            try:
                child = model.model_validate(child).model_dump(mode="json")
            except ValidationError as exc:
                raise MedalloyError(f"config field '{'.'.join(parts[: i + 1])}': {exc.errors()[0]['msg']}", where, "fix the value") from None
        elif not isinstance(child, dict):
            child = {}
        node[part] = child = dict(child)
        node = child
