"""Recipe configs: a YAML file (optional) plus command-line overrides, validated by pydantic."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from medalloy.errors import MedalloyError

C = TypeVar("C", bound=BaseModel)

# CLI overrides that belong to the engine's ``train`` section
TRAIN_KEYS = ("steps", "lr", "seed", "precision", "val_every", "device", "ema_decay", "time_budget_minutes")


def load_recipe_config(cls: type[C], path: str | Path | BaseModel | None, top_keys: tuple[str, ...], overrides: dict[str, Any]) -> C:
    """``cls`` from the YAML at ``path`` (if any; or a ``cls`` instance, left unchanged) with
    ``overrides`` applied: engine keys go to ``train`` (whose defaults are ``cls()``'s),
    ``top_keys`` to the top level; None means unset. Always a new object."""
    unknown = sorted(k for k, v in overrides.items() if v is not None and k not in TRAIN_KEYS and k not in top_keys)
    if unknown:
        raise MedalloyError(f"unknown setting(s) {', '.join(unknown)} for {cls.__name__}", fix=f"use {', '.join(TRAIN_KEYS + top_keys)}, or put others in the YAML config")
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
    train.update({k: overrides[k] for k in TRAIN_KEYS if overrides.get(k) is not None})
    raw["train"] = train
    for k in top_keys:
        if overrides.get(k) is None:
            continue
        both_mappings = isinstance(overrides[k], dict) and isinstance(raw.get(k), dict)
        # a mapping changes only the fields it names (e.g. a preset under the YAML's own fields of that section)
        raw[k] = {**raw[k], **overrides[k]} if both_mappings else overrides[k]
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise MedalloyError(first_error(exc), path or "config", "fix the value") from None


def first_error(exc: ValidationError) -> str:
    """A pydantic error in one line: ``config field 'train.lr': <message>`` (its first error)."""
    err = exc.errors()[0]
    return f"config field '{'.'.join(str(x) for x in err['loc'])}': {err['msg']}"
