"""The encoder half of the expert U-Net, on its own: what image pretraining trains and what an expert
starts from (``medalloy train expert DATASET --init RUN``).

It is MONAI's DynUNet of the same layout, with the decoder dropped: the submodules keep
DynUNet's names (``input_block``, ``downsamples.<i>``, ``bottleneck``) and the stages medalloy's
names (``enc0`` ... ``enc{n-1}``, ``bottleneck``), so its state dict loads into an expert's network
key for key.
"""

from __future__ import annotations

import torch
from torch import nn

from medalloy.errors import MedalloyError
from medalloy.models.features import STAGES_ATTR
from medalloy.models.unet import UNetLayout, build_unet, unet_stages

ENCODER_MODULES = ("input_block", "downsamples", "bottleneck")
_FIT = "train the expert with the encoder's network: omit --plan, or copy 'network' and 'in_channels' from the pretraining run's plan.json"


class UNetEncoder(nn.Module):
    """``(B, in_channels, *patch) -> [enc0, ..., enc{n-1}, bottleneck]`` features, finest first;
    stage ``i`` has ``network.filters[i]`` channels. The encoder of ``build_unet(network, in_channels,
    out_channels)``: the decoder is dropped, but DynUNet draws its initial weights after building every
    block, so ``out_channels`` still decides which weights a seed gives."""

    def __init__(self, network: UNetLayout, in_channels: int, out_channels: int):
        super().__init__()
        net = build_unet(network, in_channels, out_channels)
        self.input_block = net.input_block
        self.downsamples = net.downsamples
        self.bottleneck = net.bottleneck
        self.filters = list(network.filters)
        setattr(self, STAGES_ATTR, {k: v for k, v in unet_stages(net).items() if not k.startswith("dec")})

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.input_block(x)]
        for down in self.downsamples:
            feats.append(down(feats[-1]))
        feats.append(self.bottleneck(feats[-1]))
        return feats


def encoder_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of a DynUNet (or :class:`UNetEncoder`) state dict that belong to the encoder."""
    return {k: v for k, v in state.items() if k.split(".", 1)[0] in ENCODER_MODULES}


def stage_of(key: str, stages: dict[str, str]) -> str:
    """The medalloy stage name (``enc2``, ``bottleneck``) of a DynUNet state-dict key."""
    for name, path in stages.items():
        if key == path or key.startswith(path + "."):
            return name
    return key.split(".", 1)[0]


def load_encoder_into(net: nn.Module, state: dict[str, torch.Tensor], source: object) -> int:
    """Copy pretrained encoder weights ``state`` into ``net`` (a DynUNet from a plan); returns the
    number of tensors loaded. A missing tensor or another shape is a one-line error naming the
    first stage that differs, so a plan that does not fit is refused before any training."""
    stages = getattr(net, STAGES_ATTR, {})
    own = encoder_state(net.state_dict())
    for key, value in own.items():
        if key not in state:
            raise MedalloyError(
                f"pretrained encoder has no weights for stage '{stage_of(key, stages)}' ({key})",
                source,
                _FIT,
            )
        if tuple(state[key].shape) != tuple(value.shape):
            raise MedalloyError(
                f"stage '{stage_of(key, stages)}' does not fit: pretrained {key} is {tuple(state[key].shape)}, the expert's plan needs {tuple(value.shape)}",
                source,
                _FIT,
            )
    extra = sorted(set(state) - set(own))
    if extra:
        raise MedalloyError(
            f"pretrained encoder has stage '{stage_of(extra[0], stages)}' that the expert's plan lacks ({len(extra)} tensors)",
            source,
            _FIT,
        )
    with torch.no_grad():
        params = dict(net.named_parameters())
        buffers = dict(net.named_buffers())
        for key in own:
            target = params.get(key, buffers.get(key))
            target.copy_(state[key].to(target.dtype))
    return len(own)
