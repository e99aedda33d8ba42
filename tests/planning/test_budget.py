"""The budget planner on synthetic step timings: the finest plan expected to converge within the
budget, a coarser or narrower one where the full-resolution plan cannot reach its minimum epochs,
never a coarser plan for a larger budget, and the reasoning in plan.json."""

from __future__ import annotations

import numpy as np
import pytest
from planning_toys import ToyCase, write_dataset

from medalloy.errors import MedalloyError
from medalloy.planning.budget import choose_for_budget, samples_per_epoch
from medalloy.planning.fingerprint import fingerprint
from medalloy.planning.plan import load_plan, save_plan
from medalloy.planning.planner import plan_dataset

LABELS = {"background": 0, "organ": 1}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    rng = np.random.default_rng(0)
    cases = {}
    for i in range(4):
        label = np.zeros((48, 48, 48), np.uint8)
        label[12:36, 12:36, 12:36] = 1
        cases[f"v{i}"] = ToyCase(rng.random((1, 48, 48, 48)).astype(np.float32), label, (1.0, 1.0, 1.0))
    ds = write_dataset(tmp_path_factory.mktemp("b") / "Dataset030_Vol", cases, {"0": "MRI"}, LABELS, ".nii.gz", "Vol")
    return ds, fingerprint(ds, progress=False)


def compute_seconds(plan) -> float:
    """A step's cost as a CPU's: proportional to voxels x batch x the network's width squared."""
    return 1e-9 * float(np.prod(plan.patch_size)) * plan.batch_size * plan.network.filters[0] ** 2 * 50


def test_a_large_budget_keeps_the_planners_own_plan(dataset):
    ds, fp = dataset
    plan = choose_for_budget(ds, fp, 600, compute_seconds, train_cases=40)
    own = plan_dataset(ds, fp)
    assert plan.model_copy(update={"budget": None, "notes": own.notes}) == own  # the same plan, reasoning added
    assert plan.budget.chosen == "full resolution" and plan.budget.candidates[0].expected_epochs >= plan.budget.min_epochs


def test_a_budget_too_small_for_full_resolution_picks_a_lower_resolution_or_a_narrower_network(dataset):
    ds, fp = dataset
    plan = choose_for_budget(ds, fp, 0.5, compute_seconds, train_cases=40)
    full = plan.budget.candidates[0]
    assert full.expected_epochs < plan.budget.min_epochs
    chosen = next(c for c in plan.budget.candidates if c.name == plan.budget.chosen)
    assert chosen.expected_epochs >= plan.budget.min_epochs and chosen.name != "full resolution"
    finer = plan.budget.candidates[: plan.budget.candidates.index(chosen)]
    assert all(c.expected_epochs < plan.budget.min_epochs for c in finer)  # the finest that reaches it
    assert plan.patch_size == chosen.patch_size and plan.network.filters == chosen.filters
    assert np.prod(plan.patch_size) * plan.network.filters[0] ** 2 < np.prod(full.patch_size) * full.filters[0] ** 2
    assert "would reach only" in plan.budget.why and plan.budget.chosen in plan.notes[-1]


def test_a_larger_budget_never_chooses_a_coarser_plan(dataset):
    ds, fp = dataset
    order, last = None, None
    for minutes in (0.05, 0.2, 0.5, 1, 2, 5, 20, 100):
        plan = choose_for_budget(ds, fp, minutes, compute_seconds, train_cases=40)
        names = [c.name for c in plan.budget.candidates]
        order = order or names
        assert names == order
        rank = names.index(plan.budget.chosen)
        assert last is None or rank <= last, (minutes, plan.budget.chosen)
        last = rank
    assert last == 0


def test_when_nothing_converges_the_cheapest_is_chosen_and_the_plan_says_so(dataset):
    ds, fp = dataset
    plan = choose_for_budget(ds, fp, 0.001, compute_seconds, train_cases=40)
    cheapest = min(plan.budget.candidates, key=lambda c: c.seconds_per_step)
    assert plan.budget.chosen == cheapest.name and "no candidate reaches" in plan.budget.why


def test_the_reasoning_is_in_plan_json(dataset, tmp_path):
    ds, fp = dataset
    plan = choose_for_budget(ds, fp, 0.5, compute_seconds, train_cases=40, machine="a test machine")
    save_plan(plan, tmp_path / "plan.json")
    back = load_plan(tmp_path / "plan.json")
    assert back == plan and back.budget.machine == "a test machine"
    assert [c.expected_steps for c in back.budget.candidates] == [int(0.5 * 60 / c.seconds_per_step) for c in back.budget.candidates]


def test_expected_epochs_count_the_cases_a_step_samples(dataset):
    ds, fp = dataset
    plan = choose_for_budget(ds, fp, 3, lambda p: 0.5, train_cases=10)
    c = plan.budget.candidates[0]
    assert c.expected_epochs == pytest.approx(round(c.expected_steps * c.batch_size / 10, 1))
    sliced = plan_dataset(ds, fp).model_copy(update={"slice_axis": 2, "median_shape": [48, 48, 9]})
    assert samples_per_epoch(sliced, 10) == 90  # a volume trained per slice gives its slices


def test_a_lower_resolution_plan_coarsens_the_target_spacing(dataset):
    ds, fp = dataset
    own, low = plan_dataset(ds, fp), plan_dataset(ds, fp, resolution_factor=2.0)
    assert low.target_spacing == [2 * s for s in own.target_spacing]
    assert np.prod(low.patch_size) < np.prod(own.patch_size)
    with pytest.raises(MedalloyError, match="resolution_factor"):
        plan_dataset(ds, fp, resolution_factor=0.5)
    with pytest.raises(MedalloyError, match="positive"):
        choose_for_budget(ds, fp, 0, compute_seconds, train_cases=4)
