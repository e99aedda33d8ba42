"""A plan for a time budget: the finest configuration expected to converge within it.

The planner's rules (:mod:`medalloy.planning.planner`) give one plan per dataset whatever the
budget; the budget then only sets how many steps run. With a budget, candidate plans are made by
the same rules at coarser resolutions (nnU-Net's ``3d_lowres`` idea: a coarser target spacing, the
prediction resampled back to each image's own geometry) and with narrower networks, each one's
step time is measured on this machine (:func:`choose_for_budget` takes the timing as a callable,
so planning stays free of networks), and the first candidate, in order of quality, whose expected
training reaches ``min_epochs`` is chosen; where none does, the cheapest. Quality goes resolution
first, then width, so a larger budget never chooses a coarser plan.

An *epoch* here is the training cases seen once: ``steps * batch / cases`` (a case of a volume
trained per slice counts its slices), whatever the patch covers of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from medalloy.data.dataset import RawDataset
from medalloy.errors import MedalloyError
from medalloy.planning.plan import BudgetCandidate, BudgetChoice, Plan
from medalloy.planning.planner import plan_dataset

RESOLUTION_FACTORS = (1.0, 1.5, 2.0, 3.0)  # target spacing x this; 1 is the planner's own
WIDTH_FACTORS = (1.0, 0.5)  # base filters x this
MIN_EPOCHS = 25.0
# what a step costs beyond the network's forward, backward and update (sampling, augmentation,
# validation, checkpoints), as a share of the measured step: the engine's overhead on 2D experts
STEP_OVERHEAD = 1.15


def candidate_settings(base_filters: int = 16) -> list[tuple[str, dict[str, Any]]]:
    """(name, planner settings) of every candidate, best first."""
    out = []
    for r in RESOLUTION_FACTORS:
        for w in WIDTH_FACTORS:
            filters = max(4, int(round(base_filters * w)))
            name = ("full resolution" if r == 1.0 else f"resolution / {r:g}") + ("" if w == 1.0 else f", {filters} base filters")
            out.append((name, {"resolution_factor": r, "base_filters": filters}))
    return out


def samples_per_epoch(plan: Plan, cases: int) -> int:
    """Training samples in one pass over the cases: a volume sliced for a 2D plan gives its slices."""
    if plan.slice_axis is not None and plan.median_shape:
        return cases * max(1, int(plan.median_shape[plan.slice_axis]))
    return cases


def choose_for_budget(
    dataset: RawDataset,
    fp: dict,
    minutes: float,
    step_seconds: Callable[[Plan], float],
    train_cases: int,
    *,
    min_epochs: float = MIN_EPOCHS,
    machine: str = "",
    **planner: Any,
) -> Plan:
    """The plan for a ``minutes`` budget (the reasoning in ``plan.budget`` and its notes).

    ``step_seconds(plan)``: seconds of one training step of that plan on this machine (measured);
    ``train_cases``: the cases a fold trains on; ``planner``: the planner's other settings."""
    if minutes <= 0:
        raise MedalloyError(f"budget of {minutes} minutes", fix="give a positive --budget-minutes")
    if train_cases < 1:
        raise MedalloyError("no training cases to plan a budget for", dataset.root, "label some cases in imagesTr/labelsTr")
    base_filters = int(planner.pop("base_filters", 16))
    rows: list[BudgetCandidate] = []
    plans: list[Plan] = []
    for name, settings in candidate_settings(base_filters):
        plan = plan_dataset(dataset, fp, **planner, **settings)
        if plans and plan.patch_size == plans[-1].patch_size and plan.target_spacing == plans[-1].target_spacing and plan.network == plans[-1].network:
            continue  # a coarser factor that changes nothing (a small image already at its floor)
        seconds = max(round(float(step_seconds(plan)) * STEP_OVERHEAD, 6), 1e-6)  # as recorded, so the record adds up
        steps = int(minutes * 60.0 / seconds)
        epochs = steps * plan.batch_size / samples_per_epoch(plan, train_cases)
        rows.append(BudgetCandidate(name=name, patch_size=plan.patch_size, target_spacing=plan.target_spacing, filters=plan.network.filters,
                                    batch_size=plan.batch_size, seconds_per_step=seconds, expected_steps=steps, expected_epochs=round(epochs, 1)))  # fmt: skip
        plans.append(plan)
    fits = [i for i, r in enumerate(rows) if r.expected_epochs >= min_epochs]
    pick = fits[0] if fits else min(range(len(rows)), key=lambda i: rows[i].seconds_per_step)
    chosen = rows[pick]
    if pick == 0:
        why = f"the planner's own plan reaches {chosen.expected_epochs:g} epochs (>= {min_epochs:g}) in {minutes:g} minutes"
    elif fits:
        why = f"{rows[0].name} would reach only {rows[0].expected_epochs:g} epochs; {chosen.name} is the finest to reach {min_epochs:g} ({chosen.expected_epochs:g})"
    else:
        why = f"no candidate reaches {min_epochs:g} epochs in {minutes:g} minutes; {chosen.name}, the cheapest, reaches {chosen.expected_epochs:g}"
    choice = BudgetChoice(minutes=minutes, min_epochs=min_epochs, train_cases=train_cases, chosen=chosen.name, why=why, machine=machine, candidates=rows)
    plan = plans[pick]
    notes = [*plan.notes, f"budget {minutes:g} min: {why} (expected {chosen.expected_steps} steps of {chosen.seconds_per_step:g} s)"]
    return plan.model_copy(update={"budget": choice, "notes": notes})
