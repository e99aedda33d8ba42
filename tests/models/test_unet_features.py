"""U-Net factory output shapes and FeatureTap stages (channels, resolutions, errors, hook clean-up)."""

from __future__ import annotations

import pytest
import torch

from medalloy.errors import MedalloyError
from medalloy.models import FeatureTap, build_unet, stage_names
from medalloy.models.unet import Layout, count_parameters
from medalloy.planning.plan import ChannelNorm, NetworkPlan, Plan


def _network(dim: int, filters=(4, 8, 16)) -> NetworkPlan:
    n = len(filters)
    return NetworkPlan(
        kernels=[[3] * dim] * n,
        strides=[[1] * dim] + [[2] * dim] * (n - 1),
        filters=list(filters),
    )


def _plan(dim: int) -> Plan:
    return Plan(
        dataset="Toy",
        dim=dim,
        in_channels=2,
        target_spacing=[1.0] * dim,
        patch_size=[16] * dim,
        batch_size=2,
        normalization=[ChannelNorm(scheme="zscore")] * 2,
        label_values=[0, 1, 2],
        labels={"background": 0, "a": 1, "b": 2},
        network=_network(dim),
    )


def test_build_2d_from_network_plan():
    net = build_unet(_network(2), in_channels=1, out_channels=3).eval()
    with torch.no_grad():
        out = net(torch.zeros(2, 1, 32, 32))
    assert out.shape == (2, 3, 32, 32)


def test_build_3d_from_plan():
    plan = _plan(3)
    net = build_unet(plan.network, plan.in_channels, plan.num_classes).eval()
    with torch.no_grad():
        out = net(torch.zeros(1, 2, 16, 16, 8))
    assert out.shape == (1, 3, 16, 16, 8)
    assert count_parameters(net) == sum(p.numel() for p in net.parameters()) > 0


def test_network_plan_without_channels_raises():
    with pytest.raises(TypeError):
        build_unet(_network(2))  # type: ignore[call-arg]


def test_a_plain_layout_builds_the_plans_network_and_deep_supervision_can_be_dropped():
    network = _network(2, (4, 8, 16, 32)).model_copy(update={"deep_supervision": True, "res_block": True})
    states = []
    for layout in (network, Layout.of(network)):
        torch.manual_seed(0)
        states.append(build_unet(layout, 1, 2).state_dict())
    plan, plain = states
    assert list(plan) == list(plain) and all(torch.equal(plan[k], plain[k]) for k in plan)  # same blocks, same weights
    assert any(k.startswith("deep_supervision_heads") for k in plan) and any("conv3" in k for k in plan)  # heads and residual blocks kept
    assert not any(k.startswith("deep_supervision_heads") for k in build_unet(network, 1, 2, deep_supervision=False).state_dict())


def test_stage_names_order():
    net = build_unet(_network(2, (4, 8, 16, 32)), in_channels=1, out_channels=2)
    assert stage_names(net) == ["enc0", "enc1", "enc2", "bottleneck", "dec2", "dec1", "dec0"]


@pytest.mark.parametrize("dim", [2, 3])
def test_feature_tap_every_stage(dim):
    filters = (4, 8, 16, 32)
    net = build_unet(_network(dim, filters), in_channels=1, out_channels=2).eval()
    size = 16
    x = torch.randn(2, 1, *([size] * dim))
    with torch.no_grad(), FeatureTap(net) as tap:
        net(x)
    # stage -> (channels, downsampling factor)
    expected = {
        "enc0": (4, 1),
        "enc1": (8, 2),
        "enc2": (16, 4),
        "bottleneck": (32, 8),
        "dec2": (16, 4),
        "dec1": (8, 2),
        "dec0": (4, 1),
    }
    assert list(tap.features) == list(expected)
    for stage, (ch, f) in expected.items():
        assert tap.features[stage].shape == (2, ch, *([size // f] * dim)), stage


def test_feature_tap_subset_detach_and_grad():
    net = build_unet(_network(2), in_channels=1, out_channels=2)
    x = torch.randn(1, 1, 16, 16)
    with FeatureTap(net, ["bottleneck"], detach=True) as tap:
        net(x)
    assert list(tap.features) == ["bottleneck"] and not tap.features["bottleneck"].requires_grad
    with FeatureTap(net, ["enc1"]) as tap:
        net(x)
    assert tap.features["enc1"].requires_grad


def test_feature_tap_hooks_removed_after_context():
    net = build_unet(_network(2), in_channels=1, out_channels=2).eval()
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        with FeatureTap(net, ["enc0", "dec0"]) as tap:
            net(x)
        first = {k: v.clone() for k, v in tap.features.items()}
        net(torch.randn(1, 1, 32, 32))  # outside the context: must not touch the features
    assert all(torch.equal(tap.features[k], first[k]) for k in first)
    assert all(not m._forward_hooks for m in net.modules())


def test_unknown_stage_and_plain_module():
    net = build_unet(_network(2), in_channels=1, out_channels=2)
    with pytest.raises(MedalloyError, match="unknown stages") as exc:
        FeatureTap(net, ["enc0", "enc9"])
    assert "enc9" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(MedalloyError, match="exposes no stages"):
        stage_names(torch.nn.Linear(2, 2))
