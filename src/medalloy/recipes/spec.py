"""Typed model specs: how to build a method's network, the contract between training and prediction.

Each method declares one spec (a :class:`ModelSpec` subclass, numbers and names only) and one
``build(spec)`` that training and loading both call, as nnU-Net's ``build_network_architecture``.
A checkpoint's record holds the spec verbatim under ``"spec"`` with its ``version``; the medalloy
version that wrote it is in the record's ``versions``. Reading a record goes through
:func:`read_spec`: the method's current version validates as it is; an older one goes through the
method's explicit migrations (version 0 is the record before specs, its fields spread over the
record); anything else is refused in one line naming its version.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from medalloy.errors import MedalloyError

S = TypeVar("S", bound="ModelSpec")

# (record, names of the checkpoint's tensors) -> the spec's fields at the next version
Migration = Callable[[dict[str, Any], Collection[str]], dict[str, Any]]

RETRAIN = "retrain it with this medalloy version"


class ModelSpec(BaseModel):
    """A method's network, as numbers and names. Subclasses set ``METHOD`` and ``VERSION`` and add
    their fields; ``version`` is written with the spec so a reader knows what it holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    METHOD: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    version: int

    @model_validator(mode="before")
    @classmethod
    def _current_version(cls, data: Any) -> Any:
        """A spec made without a ``version`` is of the current one; one of another version must be
        migrated first (:func:`read_spec`)."""
        if not isinstance(data, dict):
            return data
        if data.get("version", cls.VERSION) != cls.VERSION:
            raise ValueError(f"version {data['version']} is not {cls.VERSION}: read it with read_spec")
        return {**data, "version": cls.VERSION}

    @classmethod
    def from_config(cls: type[S], cfg: BaseModel, **fields: Any) -> S:
        """The spec of a run: ``fields``, and every other field of the spec from the config field of
        the same name (specs use their configs' names)."""
        known = {k: getattr(cfg, k) for k in cls.model_fields if k not in fields and k != "version" and hasattr(cfg, k)}
        return cls(**known, **fields)

    def to_record(self) -> dict[str, Any]:
        """The spec as the record's ``"spec"`` entry."""
        return {"method": self.METHOD, **self.model_dump(mode="json")}


_SPECS: dict[str, type[ModelSpec]] = {}
_MIGRATIONS: dict[tuple[str, int], Migration] = {}


def register_spec(cls: type[S], migrations: dict[int, Migration] | None = None) -> type[S]:
    """Make ``cls`` the spec of its method; ``migrations[v]`` turns a version-``v`` record into the
    fields of version ``v + 1`` (0: a record written before specs)."""
    if not cls.METHOD:
        raise ValueError(f"{cls.__name__} names no METHOD")
    _SPECS[cls.METHOD] = cls
    for version, fn in (migrations or {}).items():
        if version >= cls.VERSION:
            raise ValueError(f"a migration from version {version} of a version-{cls.VERSION} spec")
        _MIGRATIONS[(cls.METHOD, version)] = fn
    return cls


def read_spec(cls: type[S], record: dict[str, Any], path: str | Path, tensor_keys: Collection[str] = ()) -> S:
    """The ``cls`` spec of a checkpoint's ``record`` (``tensor_keys``: the names of its tensors, for
    migrations that tell formats apart by them), migrated to the current version."""
    raw = record.get("spec")
    version = 0 if raw is None else raw.get("version") if isinstance(raw, dict) else None
    if not isinstance(version, int) or version > cls.VERSION:
        raise MedalloyError(f"{cls.METHOD} model spec of version {version}, this medalloy reads up to {cls.VERSION}", path, "upgrade medalloy")
    fields = {k: v for k, v in raw.items() if k != "method"} if raw is not None else None
    try:
        while version < cls.VERSION:
            step = _MIGRATIONS.get((cls.METHOD, version))
            if step is None:
                raise MedalloyError(f"{cls.METHOD} checkpoint of spec version {version}: no longer read", path, RETRAIN)
            fields = {**step(record if fields is None else {**record, "spec": fields}, tensor_keys), "version": version + 1}
            version += 1
        return cls.model_validate(fields)
    except (KeyError, TypeError, ValueError, ValidationError) as exc:
        what = "the record before model specs" if raw is None else f"spec version {raw.get('version')}"
        raise MedalloyError(f"{cls.METHOD} checkpoint ({what}) lacks a valid model description ({_reason(exc)})", path, RETRAIN) from None


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        return f"'{'.'.join(str(x) for x in err['loc'])}': {err['msg']}"
    if isinstance(exc, KeyError):
        return f"no '{exc.args[0]}'"
    return str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
