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
"""

from __future__ import annotations

from monai.networks.nets import DynUNet
from torch import nn

from medalloy.errors import MedalloyError
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


def build_student(plan: Plan, size: str | int = "tiny", out_channels: int | None = None, separable: bool = False) -> DynUNet:
    """The plan's U-Net at the widest base width within the size's parameter budget (no deep
    supervision); ``separable``: with depthwise-separable convolutions."""
    if isinstance(size, str) and size.isdigit():
        size = int(size)
    budget = STUDENT_SIZES.get(size) if isinstance(size, str) else int(size)
    if budget is None:
        raise MedalloyError(f"unknown student size '{size}'", fix=f"use one of {', '.join(STUDENT_SIZES)} or a parameter count")
    stages = len(plan.network.strides)
    best = None
    for base in range(2, 129):
        network = plan.network.model_copy(update={"filters": student_filters(base, stages), "deep_supervision": False, "architecture": "DynUNet"})  # a student is a DynUNet, whatever the teacher
        net = build_unet(network, in_channels=plan.in_channels, out_channels=out_channels or plan.num_classes, spatial_dims=plan.dim)
        if separable:
            make_separable(net)
        if count_parameters(net) > budget:
            break
        best = net
    if best is None:
        raise MedalloyError(f"no student of this plan's {stages} stages fits {budget} parameters", fix="give a larger size (small, or a parameter count)")
    return best
