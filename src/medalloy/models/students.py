"""Lightweight students for distillation: the plan's own U-Net topology (MONAI DynUNet, blocks
unchanged) at a width chosen to fit a parameter budget.

``build_student(plan, size)`` keeps the plan's kernels and strides (so the student sees the same
field of view and resolutions as its teacher) and picks the widest filters
``[min(b * 2**i, 4 * b) for each stage]`` whose network has at most the size's parameters
(capped at 4 b, not nnU-Net's doubling to the bottom: a budget spent on deep stages left 6 channels
at full resolution, and such JSRT students ended at heart Dice 0; 11..44 learns it,
docs/methods/distillation.md):
``tiny`` 0.35 M (the paper's student has ~353 k), ``small`` 1.0 M; an int is a budget of its own.

``separable=True`` replaces every k x k convolution of the network (but the first, which reads only
the image's 1-3 channels) by a depthwise k x k convolution and a pointwise 1 x 1 one (MobileNet's
factorisation): about k^2 times fewer weights per layer, so the same budget buys wider filters.
The DynUNet's blocks, stage names and resolutions stay; only their convolution layers change.

``stem=True`` starts the network at the plan's first pooling instead of full resolution: the first
stage takes the stride of the plan's second (the full-resolution stage is dropped, the total stride
and the bottleneck's resolution stay the teacher's), and the logits are interpolated back to the
input size. At 11-44 channels the full-resolution stages cost more time than their FLOPs say (memory
traffic of norms and copies, docs/methods/distillation.md), so the stem buys latency; stage names
keep the teacher's resolutions (the stem student's first stage is ``enc1``; it has no ``enc0`` or
``dec0``), so the relation losses compare features of equal resolution.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from monai.networks.nets import DynUNet
from torch import nn

from medalloy.errors import MedalloyError
from medalloy.models.features import STAGES_ATTR
from medalloy.models.unet import build_unet, count_parameters
from medalloy.planning.plan import Plan

STUDENT_SIZES = {"tiny": 350_000, "small": 1_000_000}


def student_filters(base: int, stages: int) -> list[int]:
    return [min(base * 2**i, 4 * base) for i in range(stages)]


def make_separable(net: nn.Module) -> nn.Module:
    """``net`` with each k x k convolution (k > 1, one group, >= 4 input channels) replaced, in
    place, by ``Sequential(depthwise k x k, pointwise 1 x 1)`` of the same stride, padding and output."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in (nn.Conv2d, nn.Conv3d) and max(child.kernel_size) > 1 and child.groups == 1 and child.in_channels >= 4:
                conv = type(child)
                depthwise = conv(
                    child.in_channels, child.in_channels, child.kernel_size, child.stride, child.padding, child.dilation, groups=child.in_channels, bias=False
                )
                setattr(parent, name, nn.Sequential(depthwise, conv(child.in_channels, child.out_channels, 1, bias=child.bias is not None)))
    return net


def _one_finer(name: str) -> str:
    """``enc2`` -> ``enc3``, ``dec0`` -> ``dec1``: a stem network's stage named by the teacher stage of its resolution."""
    m = re.fullmatch(r"(enc|dec)(\d+)", name)
    return f"{m.group(1)}{int(m.group(2)) + 1}" if m else name


class StemStudent(nn.Module):
    """A U-Net whose first stage is strided, its logits interpolated back to the input size.

    ``(B, C, *patch) -> (B, K, *patch)``; ``net`` sees the image at the stem's stride and returns
    ``(B, K, *patch / stem)``."""

    def __init__(self, net: DynUNet, dim: int):
        super().__init__()
        self.net = net
        self.mode = "bilinear" if dim == 2 else "trilinear"
        setattr(self, STAGES_ATTR, {_one_finer(k): f"net.{v}" for k, v in getattr(net, STAGES_ATTR).items()})

    @property
    def filters(self) -> list[int]:
        return list(self.net.filters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.net(x), size=x.shape[2:], mode=self.mode, align_corners=False)


def student_model(plan: Plan, filters: list[int], out_channels: int | None = None, separable: bool = False, stem: bool = False) -> nn.Module:
    """The student network of ``plan`` with these filters (a checkpoint's record rebuilds it this way)."""
    network = plan.network
    if stem:
        if len(network.strides) < 3:
            raise MedalloyError(f"a stem student needs a plan of at least 3 stages; this one has {len(network.strides)}", fix="distil without --stem")
        network = network.model_copy(update={"kernels": network.kernels[1:], "strides": network.strides[1:]})
    network = network.model_copy(update={"filters": list(filters), "deep_supervision": False, "architecture": "DynUNet"})  # a student is a DynUNet, whatever the teacher
    net: nn.Module = build_unet(network, in_channels=plan.in_channels, out_channels=out_channels or plan.num_classes, spatial_dims=plan.dim)
    if stem:
        net = StemStudent(net, plan.dim)
    if separable:
        make_separable(net)
    return net


def student_stages(plan: Plan, stem: bool = False) -> int:
    return len(plan.network.strides) - (1 if stem else 0)


def build_student(plan: Plan, size: str | int = "tiny", out_channels: int | None = None, separable: bool = False, stem: bool = False) -> nn.Module:
    """The plan's U-Net at the widest base width within the size's parameter budget (no deep
    supervision); ``separable``: with depthwise-separable convolutions; ``stem``: a
    :class:`StemStudent`, from the plan's first pooling on."""
    if isinstance(size, str) and size.isdigit():
        size = int(size)
    budget = STUDENT_SIZES.get(size) if isinstance(size, str) else int(size)
    if budget is None:
        raise MedalloyError(f"unknown student size '{size}'", fix=f"use one of {', '.join(STUDENT_SIZES)} or a parameter count")
    stages = student_stages(plan, stem)
    best = None
    for base in range(2, 129):
        net = student_model(plan, student_filters(base, stages), out_channels, separable, stem)
        if count_parameters(net) > budget:
            break
        best = net
    if best is None:
        raise MedalloyError(f"no student of this plan's {stages} stages fits {budget} parameters", fix="give a larger size (small, or a parameter count)")
    return best
