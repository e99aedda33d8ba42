"""Typed model specs: versions, migrations in order, one-line refusals, fields from a config."""

from __future__ import annotations

import json
from typing import ClassVar

import pytest
from pydantic import BaseModel, ValidationError

from medalloy.errors import MedalloyError
from medalloy.recipes.spec import ModelSpec, read_spec, register_spec


class ToySpec(ModelSpec):
    METHOD: ClassVar[str] = "toy"
    VERSION: ClassVar[int] = 3

    width: int
    depth: int = 1
    name: str = "a"


# each step leaves its mark, so the order in which they ran shows in the result
register_spec(
    ToySpec,
    {
        0: lambda record, keys: {"width": record["legacy_width"], "trail": ["0"], "keys": sorted(keys)},
        1: lambda record, keys: {**{k: v for k, v in record["spec"].items() if k != "keys"}, "trail": record["spec"]["trail"] + ["1"]},
        2: lambda record, keys: {"width": record["spec"]["width"] * 2, "name": "-".join(record["spec"]["trail"] + ["2"])},
    },
)


def test_new_spec_is_of_its_version_and_records_its_method():
    spec = ToySpec(width=4)
    assert spec.version == 3
    rec = spec.to_record()
    assert rec == {"method": "toy", "version": 3, "width": 4, "depth": 1, "name": "a"}
    assert read_spec(ToySpec, {"spec": json.loads(json.dumps(rec))}, "ck") == spec
    with pytest.raises(ValidationError):
        ToySpec(width=4, version=2)  # an older spec is read through its migrations, never as it is
    with pytest.raises(ValidationError):
        ToySpec(width=4, colour="red")  # unknown fields are refused


def test_migrations_run_in_order_from_the_record_before_specs():
    spec = read_spec(ToySpec, {"legacy_width": 5}, "ck", tensor_keys={"model/b", "model/a"})
    assert (spec.width, spec.name, spec.version) == (10, "0-1-2", 3)
    spec1 = read_spec(ToySpec, {"spec": {"method": "toy", "version": 2, "width": 3, "trail": []}}, "ck")
    assert (spec1.width, spec1.name) == (6, "2")  # version 2 starts at the last step


def test_unreadable_records_are_refused_in_one_line():
    with pytest.raises(MedalloyError, match=r"ck: toy model spec of version 4, this medalloy reads up to 3; upgrade medalloy"):
        read_spec(ToySpec, {"spec": {"version": 4, "width": 1}}, "ck")
    with pytest.raises(MedalloyError, match=r"ck: toy checkpoint \(the record before model specs\) lacks a valid model description \(no 'legacy_width'\)"):
        read_spec(ToySpec, {"other": 1}, "ck")
    with pytest.raises(MedalloyError, match=r"'width': Input should be a valid integer"):
        read_spec(ToySpec, {"spec": {"version": 3, "width": "wide"}}, "ck")
    with pytest.raises(MedalloyError, match="version None"):
        read_spec(ToySpec, {"spec": {"width": 1}}, "ck")


def test_a_version_without_its_migration_is_no_longer_read():
    class Later(ModelSpec):
        METHOD: ClassVar[str] = "later"
        VERSION: ClassVar[int] = 2
        width: int

    register_spec(Later, {1: lambda record, keys: dict(record["spec"])})
    assert read_spec(Later, {"spec": {"version": 1, "width": 2}}, "ck").width == 2
    with pytest.raises(MedalloyError, match=r"ck: later checkpoint of spec version 0: no longer read; retrain it with this medalloy version"):
        read_spec(Later, {"width": 2}, "ck")


def test_register_refuses_a_spec_without_method_or_a_migration_from_its_own_version():
    class Nameless(ModelSpec):
        width: int

    with pytest.raises(ValueError):
        register_spec(Nameless)
    with pytest.raises(ValueError):
        register_spec(ToySpec, {3: lambda record, keys: {}})


def test_fields_come_from_the_config_of_the_same_names():
    class Cfg(BaseModel):
        width: int = 7
        name: str = "cfg"
        lr: float = 0.1  # not a spec field: left out

    spec = ToySpec.from_config(Cfg(), name="given")
    assert (spec.width, spec.depth, spec.name) == (7, 1, "given")
