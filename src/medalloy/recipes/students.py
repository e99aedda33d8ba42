"""A distillation student from the teacher's plan: the plan's U-Net topology at a width chosen to fit
a parameter budget (the networks and their arithmetic: :mod:`medalloy.models.students`).

``build_student(plan, size)``: ``tiny`` 0.35 M parameters (the paper's student has ~353 k), ``small``
1.0 M; an int is a budget of its own. A plan JSON (``medalloy plan DATASET --base-filters 8 --out
student.json``) gives the filters directly: its kernels and strides must be the teacher plan's (the
relation losses compare stages of equal resolution), its filters are the student's (a stem student
drops the finest ones with their stages).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from medalloy.errors import MedalloyError
from medalloy.models.students import deepest_stem, student_model, widest_student
from medalloy.planning.plan import Plan, load_plan

STUDENT_SIZES = {"tiny": 350_000, "small": 1_000_000}


def default_stem(plan: Plan, deepest: int = 2) -> int:
    """The stem a student of ``plan`` gets by default: :func:`~medalloy.models.students.deepest_stem`
    of its strides and patch (2: a 224 px radiograph starts at 56 px; a 40 px hippocampus patch gets none)."""
    return deepest_stem(plan.network.strides, plan.patch_size, deepest)


def plan_filters(plan: Plan, path: str | Path) -> list[int]:
    """The filters of the student plan at ``path``, once its network is checked against the
    teacher's ``plan`` stage by stage (same dimension, depth, kernels and strides)."""
    own = load_plan(path)
    if own.dim != plan.dim:
        raise MedalloyError(f"student plan is {own.dim}D, the teacher's {plan.dim}D", path, "plan the student on the teacher's dataset")
    mine, theirs = own.network, plan.network
    if len(mine.strides) != len(theirs.strides):
        raise MedalloyError(
            f"student plan has {len(mine.strides)} stages, the teacher's {len(theirs.strides)}", path, "plan the student on the teacher's dataset, changing only --base-filters"
        )  # fmt: skip
    for i, (k, s, tk, ts) in enumerate(zip(mine.kernels, mine.strides, theirs.kernels, theirs.strides)):
        if (k, s) != (tk, ts):
            raise MedalloyError(
                f"student plan's stage {i} (kernel {k}, stride {s}) differs from the teacher's (kernel {tk}, stride {ts})",
                path, "keep the teacher plan's kernels and strides; change only the filters",
            )  # fmt: skip
    return [int(f) for f in mine.filters]


def student_stages(plan: Plan, stem: int | bool = 0) -> int:
    return len(plan.network.strides) - int(stem)


def build_student(
    plan: Plan, size: str | int = "tiny", out_channels: int | None = None, separable: bool = False, stem: int | bool = 0, upsample: str = "interpolate"
) -> nn.Module:
    """The plan's U-Net at the widest base width within the size's parameter budget (no deep
    supervision), or with the filters of a plan JSON (``size`` a path ending in ``.json``);
    ``out_channels`` (None: the plan's classes); ``separable``: with depthwise-separable convolutions;
    ``stem``: a :class:`~medalloy.models.students.StemStudent` without the ``stem`` finest stages,
    ``upsample`` its logits' way back."""
    out_channels = out_channels or plan.num_classes
    if isinstance(size, str) and size.lower().endswith(".json"):
        return student_model(plan.network, plan.in_channels, out_channels, plan_filters(plan, size)[int(stem) :], separable, stem, upsample)
    if isinstance(size, str) and size.isdigit():
        size = int(size)
    budget = STUDENT_SIZES.get(size) if isinstance(size, str) else int(size)
    if budget is None:
        raise MedalloyError(f"unknown student size '{size}'", fix=f"use one of {', '.join(STUDENT_SIZES)} or a parameter count")
    return widest_student(plan.network, plan.in_channels, out_channels, budget, separable, stem, upsample)
