"""The plan: every choice the trainer, the network and the predictor need, as an editable JSON file.

A plan is made by :func:`medalloy.planning.planner.plan_dataset` and may be edited by hand before
training (``medalloy train expert DATASET --plan PLAN.json``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medalloy.errors import MedalloyError
from medalloy.jsonio import read_json, write_json_atomic

Normalization = Literal["ct", "zscore", "rgb", "rescale01", "none"]


class ChannelNorm(BaseModel):
    """How one input channel is normalised.

    - ``ct``: clip to ``[clip_low, clip_high]`` (dataset foreground percentiles 0.5/99.5), then
      ``(x - mean) / std`` with the dataset's foreground statistics;
    - ``zscore``: per-image ``(x - mean(x)) / std(x)``;
    - ``rgb``: ``x / 255``;
    - ``rescale01``: per-image ``(x - min(x)) / max(x - min(x))`` (nnU-Net's ``RescaleTo01Normalization``);
    - ``none``: unchanged.
    """

    model_config = ConfigDict(extra="forbid")

    scheme: Normalization
    clip_low: float | None = None
    clip_high: float | None = None
    mean: float | None = None
    std: float | None = None


class NetworkPlan(BaseModel):
    """A U-Net: one kernel and stride per stage, ``filters[i]`` channels at stage ``i``.

    ``DynUNet``: MONAI's, built by :func:`medalloy.models.unet.build_unet`. ``nnUNet``: a trained
    nnU-Net v2 network imported by :mod:`medalloy.interop.nnunet` (built there, by nnU-Net's own
    architecture package); its kernels, strides and filters are described here all the same."""

    model_config = ConfigDict(extra="forbid")

    architecture: Literal["DynUNet", "nnUNet"] = "DynUNet"
    kernels: list[list[int]]
    strides: list[list[int]]
    filters: list[int]
    norm: str = "instance"
    deep_supervision: bool = False
    res_block: bool = False

    @model_validator(mode="after")
    def _same_depth(self) -> NetworkPlan:
        if not (len(self.kernels) == len(self.strides) == len(self.filters)):
            raise ValueError("kernels, strides and filters need one entry per stage")
        if len(self.strides) < 3:
            raise ValueError("a DynUNet needs at least 3 stages (input, one downsampling, bottleneck)")
        return self

    def total_stride(self) -> list[int]:
        """Per spatial axis, the product of the stages' strides: every input side the U-Net takes is a multiple of it."""
        return [math.prod(s[a] for s in self.strides) for a in range(len(self.strides[0]))]


class BudgetCandidate(BaseModel):
    """One configuration the budget planner weighed: its size, and what this machine makes of it."""

    model_config = ConfigDict(extra="forbid")

    name: str
    patch_size: list[int]
    target_spacing: list[float]
    filters: list[int]
    batch_size: int
    seconds_per_step: float  # measured here, the engine's overhead included
    expected_steps: int
    expected_epochs: float  # training cases seen, each as often


class BudgetChoice(BaseModel):
    """Why a plan was chosen for a time budget (:mod:`medalloy.planning.budget`): the candidates in
    order of quality, each one's measured step time and expected epochs, and the rule's reason."""

    model_config = ConfigDict(extra="forbid")

    minutes: float
    min_epochs: float
    train_cases: int
    chosen: str
    why: str
    machine: str = ""
    candidates: list[BudgetCandidate]


class Plan(BaseModel):
    """Everything decided about a dataset before training."""

    model_config = ConfigDict(extra="forbid")

    version: int = 1
    dataset: str
    dim: Literal[2, 3]
    # For a 2D plan on 3D volumes: the array axis that is sliced (the one with the coarsest spacing).
    slice_axis: int | None = None
    in_channels: int
    # Spacing to resample to, one entry per spatial axis of the *network input* (2 for 2D, 3 for 3D).
    target_spacing: list[float]
    patch_size: list[int]
    batch_size: int
    normalization: list[ChannelNorm]
    # Label values in training-class order: class i of the network is label value label_values[i].
    label_values: list[int]
    labels: dict[str, int]
    network: NetworkPlan
    foreground_oversample: float = Field(0.33, ge=0.0, le=1.0)
    median_shape: list[int] = Field(default_factory=list)
    # The dataset's median spacing (array axes, as median_shape; empty in plans made before it was
    # kept): with median_shape, the geometry that predict compares new images with (planning/input_fit.py).
    median_spacing: list[float] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    # a plan chosen for a time budget says how (None: the planner's rules alone)
    budget: BudgetChoice | None = None

    @property
    def num_classes(self) -> int:
        return len(self.label_values)

    @model_validator(mode="after")
    def _consistent(self) -> Plan:
        if len(self.patch_size) != self.dim or len(self.target_spacing) != self.dim:
            raise ValueError(f"patch_size and target_spacing need {self.dim} entries for a {self.dim}D plan")
        if len(self.normalization) != self.in_channels:
            raise ValueError("normalization needs one entry per input channel")
        for k, s in zip(self.network.kernels, self.network.strides):
            if len(k) != self.dim or len(s) != self.dim:
                raise ValueError(f"network kernels/strides need {self.dim} entries each")
        if 0 not in self.label_values:
            raise ValueError("label_values must include background 0")
        return self


def save_plan(plan: Plan, path: str | Path) -> Path:
    path = Path(path)
    write_json_atomic(path, plan.model_dump(mode="json"))
    return path


def load_plan(path: str | Path) -> Plan:
    path = Path(path)
    raw = read_json(path, "plan", "make one with `medalloy plan DATASET`")
    try:
        return Plan.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "plan"
        raise MedalloyError(f"invalid plan field '{where}': {err['msg']}", path, "fix the field or make a new plan") from None
