"""Which encoder an expert may start from, and how its plan is fitted to it."""

from __future__ import annotations

from pathlib import Path

import pytest

from medalloy.errors import MedalloyError
from medalloy.planning.plan import ChannelNorm
from medalloy.planning.planner import plan_images_2d
from medalloy.recipes.init_weights import InitEncoder, adopt_encoder_network


def _init(size: int) -> InitEncoder:
    return InitEncoder(state={}, plan=plan_images_2d(size), method="pretrain", path=Path("pre/checkpoints/best.safetensors"))


def test_plan_takes_the_encoder_network_and_a_divisible_patch():
    own = plan_images_2d(112)  # 5 stages, total stride 16
    fitted = adopt_encoder_network(own.model_copy(update={"patch_size": [112, 100]}), _init(224))  # 6 stages, total stride 32
    assert fitted.network.filters == plan_images_2d(224).network.filters
    assert fitted.patch_size == [128, 128]  # rounded up to multiples of 32
    assert "--init" in fitted.notes[-1]
    same = adopt_encoder_network(own, _init(112))
    assert same is own  # nothing to change


def test_channels_or_dimension_that_cannot_fit():
    rgb = plan_images_2d(64, in_channels=3)
    with pytest.raises(MedalloyError, match=r"stage 'enc0'.*3"):
        adopt_encoder_network(rgb, _init(64))
    vol = plan_images_2d(64).model_copy(update={"dim": 3})
    with pytest.raises(MedalloyError, match="3D"):
        adopt_encoder_network(vol, _init(64))
    assert rgb.normalization == [ChannelNorm(scheme="zscore")] * 3
