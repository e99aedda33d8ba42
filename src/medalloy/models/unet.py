"""The expert backbone: MONAI's DynUNet (nnU-Net's network) built from a plan."""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.networks.nets import DynUNet
from torch import nn

from medalloy.models.features import STAGES_ATTR
from medalloy.planning.plan import NetworkPlan, Plan


def unet_stages(net: DynUNet) -> dict[str, str]:
    """``enc0`` (full resolution) ... ``enc{n-1}``, ``bottleneck``, then ``dec{n-2}`` ... ``dec0``
    (coarse to fine), each mapped to the DynUNet submodule whose output it is."""
    stages = {"enc0": "input_block"}
    for i in range(len(net.downsamples)):
        stages[f"enc{i + 1}"] = f"downsamples.{i}"
    stages["bottleneck"] = "bottleneck"
    n_up = len(net.upsamples)
    for j in range(n_up):
        # upsamples[0] is the coarsest decoder stage.
        stages[f"dec{n_up - 1 - j}"] = f"upsamples.{j}"
    return stages


def run_stages(net: DynUNet, x: torch.Tensor, after: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """DynUNet's own forward order, block by block, up to the finest decoder features
    ``(B, filters[0], *sp)`` (before the output layer); ``after(stage, features)`` may replace each
    stage's output before the next block and the skip connection use it (prior fusion,
    amalgamation). ``net.output_block(run_stages(net, x))`` equals ``net(x)`` without deep supervision."""
    step = after or (lambda _stage, f: f)
    skips = [step("enc0", net.input_block(x))]
    for i, down in enumerate(net.downsamples):
        skips.append(step(f"enc{i + 1}", down(skips[-1])))
    f = step("bottleneck", net.bottleneck(skips[-1]))
    n_up = len(net.upsamples)
    for j, up in enumerate(net.upsamples):  # upsamples[0] is the coarsest, paired with the deepest skip
        f = step(f"dec{n_up - 1 - j}", up(f, skips[n_up - 1 - j]))
    return f


def build_unet(
    network: NetworkPlan | Plan, in_channels: int | None = None, out_channels: int | None = None, spatial_dims: int | None = None
) -> DynUNet:
    """A DynUNet from a plan (or its network part plus channel counts). ``(B, C, *patch) -> (B, K, *patch)``."""
    if isinstance(network, Plan):
        plan = network
        in_channels = plan.in_channels if in_channels is None else in_channels
        out_channels = plan.num_classes if out_channels is None else out_channels
        spatial_dims = plan.dim
        network = plan.network
    if in_channels is None or out_channels is None or spatial_dims is None:
        raise ValueError("give a Plan, or in_channels, out_channels and spatial_dims")
    net = DynUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=network.kernels,
        strides=network.strides,
        upsample_kernel_size=network.strides[1:],
        filters=network.filters,
        norm_name=network.norm,
        deep_supervision=network.deep_supervision,
        deep_supr_num=max(1, min(2, len(network.strides) - 2)),
        res_block=network.res_block,
    )
    setattr(net, STAGES_ATTR, unet_stages(net))
    return net


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
