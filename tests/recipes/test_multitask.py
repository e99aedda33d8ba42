"""Binding a multi-task network to tasks: which training dataset's preprocessing and modality serve."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medalloy.errors import MedalloyError
from medalloy.planning.plan import ChannelNorm, NetworkPlan, Plan
from medalloy.recipes.multitask import TaskRegistry, bind_tasks


def _plan(name: str, spacing: float) -> Plan:
    return Plan(
        dataset=name, dim=2, in_channels=1, target_spacing=[spacing, spacing], patch_size=[16, 16], batch_size=2,
        normalization=[ChannelNorm(scheme="none")], label_values=[0, 1, 2], labels={"background": 0, "lung": 1, "heart": 2},
        network=NetworkPlan(kernels=[[3, 3]] * 3, strides=[[1, 1], [2, 2], [2, 2]], filters=[4, 8, 16]),
    )  # fmt: skip


class Echo(nn.Module):
    """Logits that carry the task and modality ids asked: channel t = 10 * task_id + modality_id."""

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor, modality: torch.Tensor) -> dict[str, torch.Tensor]:
        code = (10 * task_ids + modality[:, None]).float()
        return {"logits": code[:, :, None, None].expand(-1, -1, *x.shape[2:])}


# lung is annotated by an X-ray set (first) and an MR set; heart only by the MR set
REGISTRY = TaskRegistry(
    tasks=["lung", "heart"],
    modalities=["xr", "mr", "unknown"],
    datasets={
        "CXR": {"task_ids": [0], "labels": {"lung": 1}, "modality": "xr", "modality_id": 0},
        "MRI": {"task_ids": [0, 1], "labels": {"lung": 1, "heart": 2}, "modality": "mr", "modality_id": 1},
    },
)
PLANS = {"CXR": _plan("CXR", 0.5), "MRI": _plan("MRI", 1.5)}
RECORD = {"spec": {"in_channels": 1}}


def _asked(model: nn.Module) -> list[float]:
    return model(torch.zeros(1, 1, 2, 2))[0, :, 0, 0].tolist()


def test_the_modality_picks_the_dataset_whose_preprocessing_serves():
    model, plan, _, note = bind_tasks(Echo(), REGISTRY, PLANS, RECORD, "run", ["lung"], modality="MR")
    assert plan.target_spacing == [1.5, 1.5] and plan.labels == {"background": 0, "lung": 1}
    assert _asked(model) == [1.0]  # lung (task 0) asked with the MR modality token (1)
    assert "MRI" in note and "modality MR" in note
    # without a modality: the first dataset that annotates the first task
    model, plan, _, note = bind_tasks(Echo(), REGISTRY, PLANS, RECORD, "run", ["lung", "heart"])
    assert plan.target_spacing == [0.5, 0.5] and _asked(model) == [0.0, 10.0] and "CXR" in note
    assert plan.label_values == [0, 1, 2] and plan.labels == {"background": 0, "lung": 1, "heart": 2}
    # the modality chooses among the datasets that annotate the first task only
    with pytest.raises(MedalloyError, match="no training dataset of modality 'xr' annotates 'heart'.*--modality mr"):
        bind_tasks(Echo(), REGISTRY, PLANS, RECORD, "run", ["heart"], modality="xr")
