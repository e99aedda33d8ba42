"""The expert backbone: MONAI's DynUNet (nnU-Net's network) built from a U-Net layout and channel counts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from monai.networks.nets import DynUNet
from torch import nn

from medalloy.models.features import STAGES_ATTR


class UNetLayout(Protocol):
    """A U-Net's topology: one kernel and one stride per stage, ``filters[i]`` channels at stage ``i``.
    The plan's network part (``medalloy.planning.plan.NetworkPlan``) is one, without the models
    importing the planning layer; :class:`Layout` is a plain one."""

    @property
    def kernels(self) -> Sequence[Sequence[int]]: ...
    @property
    def strides(self) -> Sequence[Sequence[int]]: ...
    @property
    def filters(self) -> Sequence[int]: ...
    @property
    def norm(self) -> str: ...
    @property
    def deep_supervision(self) -> bool: ...
    @property
    def res_block(self) -> bool: ...


@dataclass(frozen=True)
class Layout:
    """A :class:`UNetLayout` of plain values (``dataclasses.replace`` changes a field)."""

    kernels: Sequence[Sequence[int]]
    strides: Sequence[Sequence[int]]
    filters: Sequence[int]
    norm: str = "instance"
    deep_supervision: bool = False
    res_block: bool = False

    @classmethod
    def of(cls, network: UNetLayout) -> Layout:
        return cls(list(network.kernels), list(network.strides), list(network.filters), network.norm, network.deep_supervision, network.res_block)


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


def build_unet(network: UNetLayout, in_channels: int, out_channels: int, deep_supervision: bool | None = None) -> DynUNet:
    """The DynUNet of ``network``, its spatial dimensions one per stride entry: ``(B, in_channels, *patch)
    -> (B, out_channels, *patch)``. ``deep_supervision`` overrides the layout's (None: keep it)."""
    spatial_dims = len(network.strides[0])
    net = DynUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=network.kernels,
        strides=network.strides,
        upsample_kernel_size=network.strides[1:],
        filters=network.filters,
        norm_name=network.norm,
        deep_supervision=network.deep_supervision if deep_supervision is None else deep_supervision,
        deep_supr_num=max(1, min(2, len(network.strides) - 2)),
        res_block=network.res_block,
    )
    setattr(net, STAGES_ATTR, unet_stages(net))
    return net


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
