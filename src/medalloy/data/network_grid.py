"""The network's grid for an image: its in-network spatial shape after resampling to the plan's
target spacing (numpy only: training, prediction and the torch-free deployment runtime share it)."""

from __future__ import annotations

from medalloy.data.io import ImageMeta
from medalloy.planning.plan import Plan


def net_spacing(meta: ImageMeta, plan: Plan) -> tuple[float, ...]:
    spacing = list(meta.spacing)
    if plan.dim == 2 and meta.ndim == 3:
        spacing.pop(plan.slice_axis)
    return tuple(spacing)


def network_shape(meta: ImageMeta, plan: Plan) -> tuple[int, ...]:
    """In-network spatial shape (without the slice axis) after resampling to the target spacing."""
    shape = list(meta.shape)
    if plan.dim == 2 and meta.ndim == 3:
        shape.pop(plan.slice_axis)
    spacing = net_spacing(meta, plan)
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, plan.target_spacing))
