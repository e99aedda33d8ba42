"""FLOP counts: a convolution's count is 2 x multiply-adds, and a U-Net's count grows with its input."""

from __future__ import annotations

import pytest
from torch import nn

from medalloy.models.flops import forward_gflops


def test_conv_counts_two_flops_per_multiply_add():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    # 8 x 3 x 3 x 3 multiply-adds per output position, 32 x 32 positions
    assert forward_gflops(conv, (3, 32, 32)) == pytest.approx(2 * 8 * 3 * 9 * 32 * 32 / 1e9)


def test_unet_count_scales_with_the_image_and_restores_training_mode():
    from medalloy.models.unet import build_unet
    from medalloy.planning.plan import NetworkPlan

    net = build_unet(NetworkPlan(kernels=[[3, 3]] * 3, strides=[[1, 1], [2, 2], [2, 2]], filters=[4, 8, 16]), in_channels=1, out_channels=2)
    net.train()
    small, large = forward_gflops(net, (1, 32, 32)), forward_gflops(net, (1, 64, 64))
    assert net.training
    assert large == pytest.approx(4 * small, rel=0.02)  # convolutions dominate: FLOPs scale with the pixels
