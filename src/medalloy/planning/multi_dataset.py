"""Plans for one network trained on several datasets (the universal model, amalgamation).

Each dataset keeps its own plan (spacing, normalisation) in the model's dimension; what the
datasets must share is decided here: the network, its input channels, and patches that the
network's poolings (and, for amalgamation, the SwinUNETR's and every expert's) divide.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from medalloy.data.dataset import RawDataset
from medalloy.errors import MedalloyError
from medalloy.planning.fingerprint import fingerprint
from medalloy.planning.plan import NetworkPlan, Plan
from medalloy.planning.planner import patch_and_topology, plan_dataset

# a square (cube) patch shared by every dataset mixes them in one batch of this many
MIXED_BATCH = 12


class PlanOptions(BaseModel):
    """Planner settings for one dataset of the mix (as ``medalloy plan`` takes them)."""

    model_config = ConfigDict(extra="forbid")

    max_2d_side: int | None = Field(None, ge=16)
    max_2d_patch: int | None = Field(None, ge=16)
    max_3d_voxels: int | None = Field(None, ge=4096)


def own_plan(ds: RawDataset, dim: int, options: PlanOptions | None, max_2d_side: int, base_filters: int, max_filters: int) -> Plan:
    """The dataset's own plan (its spacing, normalisation, patch, batch) in ``dim`` dimensions."""
    fp = fingerprint(ds, progress=False)
    if dim == 3 and fp["dim"] == 2:
        raise MedalloyError(f"{ds.name} holds 2D images; a 3D model of several datasets needs volumes", ds.root, "train it in a 2D model (dim: 2)")
    kw = {k: v for k, v in (options or PlanOptions()).model_dump().items() if v is not None}
    kw.setdefault("max_2d_side", max_2d_side)
    return plan_dataset(ds, fp, force_dim=dim, base_filters=base_filters, max_filters=max_filters, **kw)


def check_plan_options(options: dict[str, PlanOptions], names: list[str]) -> None:
    """Every dataset ``options`` name is one of the run's."""
    stray = sorted(set(options) - set(names))
    if stray:
        raise MedalloyError(f"plan_options names '{stray[0]}', not a dataset of this run", fix=f"key plan_options by {', '.join(names)}")


def common_in_channels(plans: dict[str, Plan]) -> int:
    """The network's input channels: the widest dataset's; the others must have 1 (repeated) or as many."""
    in_channels = max(p.in_channels for p in plans.values())
    for name, p in plans.items():
        if p.in_channels not in (1, in_channels):
            raise MedalloyError(f"{name} has {p.in_channels} channels, others {in_channels}", fix="mix datasets with 1 channel and one common channel count")
    return in_channels


def dataset_plan(own: Plan, patch: list[int], network: NetworkPlan, batch: int, label_values: list[int], note: str) -> Plan:
    """A dataset's own plan with its patch and batch in the shared model, the shared network, and
    its classes in the model's order (``label_values``, background first)."""
    return own.model_copy(
        update={"patch_size": list(patch), "network": network, "batch_size": int(batch), "label_values": list(label_values), "notes": own.notes + [note]}
    )


def shared_network(patch: int, base_filters: int, max_filters: int, dim: int = 2) -> tuple[list[int], NetworkPlan]:
    """The planner's U-Net layout for a square (cube) patch at isotropic spacing (rounded up to the poolings)."""
    size, kernels, strides = patch_and_topology(np.array([patch] * dim, float), [1.0] * dim, dim, None)
    filters = [min(base_filters * 2**i, max_filters) for i in range(len(strides))]
    return size, NetworkPlan(kernels=kernels, strides=strides, filters=filters)


def network_of(plans: dict[str, Plan]) -> tuple[str, NetworkPlan]:
    """The shared network: the topology of the plan with the most stages (then the largest patch)."""
    name = max(plans, key=lambda n: (len(plans[n].network.strides), int(np.prod(plans[n].patch_size))))
    return name, plans[name].network


def fit_patch(patch: list[int], network: NetworkPlan) -> list[int]:
    """``patch`` rounded up, per axis, to a multiple of the network's total stride."""
    return [int(-(-p // t) * t) for p, t in zip(patch, network.total_stride())]


def stride_multiple(plans: list[Plan], dim: int) -> list[int]:
    """Per axis, what every patch must be a multiple of: 32 (the SwinUNETR foundation) and each expert's total stride."""
    out = [32] * dim
    for p in plans:
        out = [math.lcm(a, b) for a, b in zip(out, p.network.total_stride())]
    return out


def _x(sizes: list[int]) -> str:
    return "x".join(map(str, sizes))


def universal_plans(
    owns: dict[str, Plan], label_values: dict[str, list[int]], patch_size: int | None, batch_size: int | None, base_filters: int,
    max_filters: int, dim: int, datasets_per_step: int,
) -> dict[str, Plan]:  # fmt: skip
    """The universal model's plans: with ``patch_size``, one square (cube) patch and network for all
    (mixed-dataset batches); else each dataset's own patch and batch on the network of the plan with
    the most stages, padded up to its poolings."""
    plans = {}
    if patch_size is not None:
        patch, network = shared_network(patch_size, base_filters, max_filters, dim)
        batch = batch_size or MIXED_BATCH
        for name, own in owns.items():
            note = f"universal model: shared patch {_x(patch)}, batch {batch}, mixed-dataset batches"
            plans[name] = dataset_plan(own, patch, network, batch, label_values[name], note)
        return plans
    source, network = network_of(owns)
    for name, own in owns.items():
        patch, batch = fit_patch(own.patch_size, network), batch_size or own.batch_size
        padded = "" if patch == own.patch_size else f" (own {_x(own.patch_size)}, padded to the network's poolings)"
        note = f"universal model: network of {source}'s plan ({len(network.strides)} stages), patch {_x(patch)}{padded}, batch {batch}, {datasets_per_step} dataset(s) a step"
        plans[name] = dataset_plan(own, patch, network, batch, label_values[name], note)
    return plans


def amalgamation_plans(owns: dict[str, Plan], label_values: dict[str, list[int]], multiple: list[int], batch_size: int | None) -> dict[str, Plan]:
    """Amalgamation's plans: each dataset's own network, patch rounded up to ``multiple`` per axis."""
    plans = {}
    for name, own in owns.items():
        patch = [int(-(-p // m) * m) for p, m in zip(own.patch_size, multiple)]
        batch = batch_size or own.batch_size
        note = f"amalgamation: patch {_x(patch)} (own {_x(own.patch_size)}, rounded to multiples of {_x(multiple)}), batch {batch}"
        plans[name] = dataset_plan(own, patch, own.network, batch, label_values[name], note)
    return plans
