"""Lightweight students for distillation: the teacher's U-Net topology (MONAI DynUNet, blocks
unchanged) at a width chosen to fit a parameter budget. The networks and their arithmetic, on a
U-Net layout and numbers; :mod:`medalloy.recipes.students` reads them from a plan.

:func:`widest_student` keeps the layout's kernels and strides (so the student sees the same
field of view and resolutions as its teacher) and picks the widest filters
``[min(b * 2**i, 4 * b) for each stage]`` whose network has at most ``budget`` parameters
(capped at 4 b, not nnU-Net's doubling to the bottom: a budget spent on deep stages left 6 channels
at full resolution, and such JSRT students ended at heart Dice 0; 11..44 learns it,
docs/methods/distillation.md).

``separable=True`` replaces every k x k convolution of the network (but the first, which reads only
the image's 1-3 channels) by a depthwise k x k convolution and a pointwise 1 x 1 one (MobileNet's
factorisation): about k^2 times fewer weights per layer, so the same budget buys wider filters.
The DynUNet's blocks, stage names and resolutions stay; only their convolution layers change.

``stem=1`` (or True) starts the network at the layout's first pooling instead of full resolution: the
first stage takes the stride of the layout's second (the full-resolution stage is dropped, the total
stride and the bottleneck's resolution stay the teacher's), and the logits are interpolated back to
the input size. ``stem=2`` drops the two finest stages: the image is first folded into channels by
the second stage's stride (space-to-depth, as a pixel unshuffle: ``(C, H, W)`` -> ``(4C, H/2, W/2)``
for stride 2, no information lost), then the network starts strided at 1/4. At 11-52 channels the
fine stages cost more time than their FLOPs say (memory traffic of norms and copies,
docs/methods/distillation.md), so the stem buys latency; stage names keep the teacher's
resolutions (a ``stem=1`` student's first stage is ``enc1``; it has no ``enc0`` or ``dec0``), so the
relation losses compare features of equal resolution.

``upsample``: how a stem student's logits return to the input size. ``"interpolate"`` (bi- or
trilinear: boundaries no finer than the stem's stride, 4 px for a stem of two) or ``"shuffle"``
(the network's last 1 x 1 convolution gives ``K * s^d`` channels, unfolded by depth-to-space into
``K`` at full resolution: each coarse position decides its ``s^d`` pixels, as ESPCN's sub-pixel
convolution; a few hundred weights more, no full-resolution operator but the unfold).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import DynUNet
from torch import nn

from medalloy.errors import MedalloyError
from medalloy.models.features import STAGES_ATTR
from medalloy.models.unet import Layout, UNetLayout, build_unet, count_parameters


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


def _finer(name: str, by: int) -> str:
    """``enc2`` -> ``enc3`` (by 1): a stem network's stage named by the teacher stage of its resolution."""
    m = re.fullmatch(r"(enc|dec)(\d+)", name)
    return f"{m.group(1)}{int(m.group(2)) + by}" if m else name


def space_to_depth(x: torch.Tensor, factors: list[int]) -> torch.Tensor:
    """``(B, C, *sp)`` -> ``(B, C * prod(factors), *(sp / factors))``: each ``factors`` block of
    positions becomes channels (``nn.PixelUnshuffle`` for any dimension; exact, no information lost)."""
    b, c, *sp = x.shape
    dims = len(sp)
    split = [v for s, f in zip(sp, factors) for v in (s // f, f)]
    x = x.reshape(b, c, *split)
    order = [0, 1, *[3 + 2 * i for i in range(dims)], *[2 + 2 * i for i in range(dims)]]
    x = x.permute(order)
    return x.reshape(b, -1, *[s // f for s, f in zip(sp, factors)])


def depth_to_space(x: torch.Tensor, factors: list[int]) -> torch.Tensor:
    """``(B, C * prod(factors), *sp)`` -> ``(B, C, *(sp * factors))``: the inverse of :func:`space_to_depth`."""
    b, c, *sp = x.shape
    dims, n = len(sp), int(np.prod(factors))
    x = x.reshape(b, c // n, *factors, *sp)
    order = [0, 1, *[v for i in range(dims) for v in (2 + dims + i, 2 + i)]]
    x = x.permute(order)
    return x.reshape(b, c // n, *[s * f for s, f in zip(sp, factors)])


UPSAMPLE = ("interpolate", "shuffle")


def check_upsample(upsample: str) -> str:
    if upsample not in UPSAMPLE:
        raise MedalloyError(f"unknown upsample '{upsample}'", fix=f"use one of {', '.join(UPSAMPLE)}")
    return upsample


class StemStudent(nn.Module):
    """A U-Net whose first stage is strided (after a space-to-depth fold when ``fold`` is given),
    its logits brought back to the input size by interpolation or depth-to-space (``shuffle``).

    ``(B, C, *patch) -> (B, K, *patch)``; ``net`` sees the image at the stem's stride ``stride`` and
    returns ``(B, K, *patch / stride)`` (``(B, K * prod(stride), ...)`` for ``shuffle``); ``depth``:
    the teacher stages it drops (stage names shift by it)."""

    def __init__(self, net: DynUNet, dim: int, depth: int = 1, fold: list[int] | None = None, stride: list[int] | None = None, upsample: str = "interpolate"):
        super().__init__()
        if check_upsample(upsample) == "shuffle" and not stride:
            raise MedalloyError("a shuffle head needs the stem's stride", fix="build the student with student_model")
        self.net = net
        self.depth, self.fold = depth, list(fold) if fold else None
        self.upsample, self.stride = upsample, [int(s) for s in stride] if stride else None
        self.mode = "bilinear" if dim == 2 else "trilinear"
        setattr(self, STAGES_ATTR, {_finer(k, depth): f"net.{v}" for k, v in getattr(net, STAGES_ATTR).items()})

    @property
    def filters(self) -> list[int]:
        return list(self.net.filters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(space_to_depth(x, self.fold) if self.fold else x)
        if self.upsample == "shuffle":
            assert self.stride is not None
            y = depth_to_space(y, self.stride)
            if tuple(y.shape[2:]) == tuple(x.shape[2:]):
                return y
        return F.interpolate(y, size=x.shape[2:], mode=self.mode, align_corners=False)


def student_model(
    network: UNetLayout,
    in_channels: int,
    out_channels: int,
    filters: Sequence[int],
    separable: bool = False,
    stem: int | bool = 0,
    upsample: str = "interpolate",
) -> nn.Module:
    """The student of the teacher layout ``network`` with these filters, ``(B, in_channels, *patch) ->
    (B, out_channels, *patch)`` (a checkpoint's record rebuilds it this way); ``stem``: how many of the
    finest stages it drops, ``upsample``: how a stem student's logits return to full resolution (see
    the module docstring)."""
    depth = int(stem)
    fold = None
    kernels, strides = list(network.kernels), list(network.strides)
    stride = [int(v) for v in np.prod(np.asarray(strides[1 : depth + 1]), axis=0)] if depth else None
    check_upsample(upsample)  # a full-resolution student has nothing to upsample, but a wrong name is still wrong
    if depth:
        if len(strides) < depth + MIN_STAGES:
            raise MedalloyError(
                f"a stem student of depth {depth} needs a plan of at least {depth + MIN_STAGES} stages; this one has {len(strides)}",
                fix="distil with a smaller --stem",
            )
        if depth > 1:  # fold the strides of the dropped stages after the first into channels
            fold = [int(v) for v in np.prod(np.asarray(strides[1:depth]), axis=0)]
            in_channels *= int(np.prod(fold))
        kernels, strides = kernels[depth:], strides[depth:]
    # a student is a DynUNet without deep supervision, whatever the teacher
    layout = dataclasses.replace(Layout.of(network), kernels=kernels, strides=strides, filters=list(filters), deep_supervision=False)
    shuffle = bool(depth) and upsample == "shuffle"
    net_out = out_channels * int(np.prod(stride)) if shuffle and stride else out_channels
    net: nn.Module = build_unet(layout, in_channels=in_channels, out_channels=net_out)
    if depth:
        net = StemStudent(net, len(strides[0]), depth, fold, stride, upsample)
    if separable:
        make_separable(net)
    return net


MIN_STAGES = 3  # MONAI's DynUNet needs at least three stages after a stem

# the stem's output must keep at least this many pixels (voxels) along every axis: finer
# structures than ~1/32 of the patch are what a 1/4-resolution student would blur away
MIN_STEM_SIDE = 32


def deepest_stem(strides: Sequence[Sequence[int]], patch_size: Sequence[int], deepest: int = 2) -> int:
    """The deepest stem (up to ``deepest``) that leaves at least three stages (MONAI's DynUNet) and at
    least :data:`MIN_STEM_SIDE` along every axis at the resolution where the student of a ``patch_size``
    U-Net of these ``strides`` starts (2: a 224 px radiograph starts at 56 px; a 40 px hippocampus patch gets none)."""
    steps = np.asarray(strides)
    patch = np.asarray(patch_size)
    for depth in range(deepest, 0, -1):
        if len(steps) >= depth + MIN_STAGES and (patch / np.prod(steps[: depth + 1], axis=0)).min() >= MIN_STEM_SIDE:
            return depth
    return 0


def widest_student(
    network: UNetLayout, in_channels: int, out_channels: int, budget: int, separable: bool = False, stem: int | bool = 0, upsample: str = "interpolate"
) -> nn.Module:
    """The student of ``network`` (see :func:`student_model`) at the widest base width whose network
    has at most ``budget`` parameters."""
    stages = len(network.strides) - int(stem)
    best = None
    for base in range(2, 129):
        net = student_model(network, in_channels, out_channels, student_filters(base, stages), separable, stem, upsample)
        if count_parameters(net) > budget:
            break
        best = net
    if best is None:
        raise MedalloyError(f"no student of this plan's {stages} stages fits {budget} parameters", fix="give a larger size (small, or a parameter count)")
    return best
