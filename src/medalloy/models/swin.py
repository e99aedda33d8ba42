"""The foundation backbone of amalgamation: MONAI's SwinUNETR, its blocks unchanged, and the
weights users already have for it.

:func:`run_swin_stages` runs SwinUNETR's blocks in its own order (as ``SwinUNETR.forward``) and
lets a caller replace a stage's output before the decoder and the skips see it, the way
:func:`~medalloy.models.unet.run_stages` does for DynUNet. Stage names follow medalloy's U-Net
(``encN``/``decN`` at 1/2^N resolution; ``feature_size`` = F)::

    enc0  encoder1(x)              F     full        dec0  decoder1  F    full (before the output layer)
    enc1  encoder2(hs[0])          F     1/2         dec1  decoder2  F    1/2
    enc2  encoder3(hs[1])          2F    1/4         dec2  decoder3  2F   1/4
    enc3  encoder4(hs[2])          4F    1/8         dec3  decoder4  4F   1/8
    enc4  hs[3] (the 1/16 skip)    8F    1/16        dec4  decoder5  8F   1/16
    bottleneck encoder10(hs[4])    16F   1/32

``hs`` are the five hidden states of the Swin transformer (``swinViT``). Inputs need sides
divisible by 32.

:func:`load_swin_weights` reads a safetensors file, MONAI's self-supervised ``model_swinvit.pt``
or a research-contributions checkpoint (``torch.load(weights_only=True)``: tensors only, nothing
unpickled that could run code), repairs the usual key differences (a ``state_dict``/``model``
wrapper, ``module.`` prefixes, ``swin_vit`` vs ``swinViT``, ``mlp.fc1`` vs ``mlp.linear1``, keys of
the bare transformer) and loads what fits, reporting loaded / missing / unexpected / mismatched keys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from medalloy.errors import MedalloyError
from medalloy.models.features import STAGES_ATTR

ENCODER_STAGES = ("enc0", "enc1", "enc2", "enc3", "enc4", "bottleneck")
DECODER_STAGES = ("dec4", "dec3", "dec2", "dec1", "dec0")
DIVISOR = 32


def swin_stage_channels(feature_size: int) -> dict[str, int]:
    """Channels of every stage (see the module docstring)."""
    f = feature_size
    return {
        "enc0": f,
        "enc1": f,
        "enc2": 2 * f,
        "enc3": 4 * f,
        "enc4": 8 * f,
        "bottleneck": 16 * f,
        "dec4": 8 * f,
        "dec3": 4 * f,
        "dec2": 2 * f,
        "dec1": f,
        "dec0": f,
    }


def swin_stage_stride(stage: str) -> int:
    """Downsampling factor of a stage (the bottleneck: 32)."""
    return 32 if stage == "bottleneck" else 2 ** int(stage[3:])


def build_swinunetr(spatial_dims: int, in_channels: int, feature_size: int = 24, out_channels: int = 1) -> nn.Module:
    """MONAI's SwinUNETR (``(B, C, *sp) -> (B, out_channels, *sp)``, sides divisible by 32), with
    medalloy stage names for :class:`~medalloy.models.features.FeatureTap` (``enc4`` is not a module
    output and is not tapped)."""
    from monai.networks.nets import SwinUNETR

    if feature_size % 12:
        raise ValueError(f"SwinUNETR's feature_size must be a multiple of 12 (its heads), not {feature_size}")
    net = SwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=feature_size, spatial_dims=spatial_dims)
    setattr(net, STAGES_ATTR, {
        "enc0": "encoder1", "enc1": "encoder2", "enc2": "encoder3", "enc3": "encoder4", "bottleneck": "encoder10",
        "dec4": "decoder5", "dec3": "decoder4", "dec2": "decoder3", "dec1": "decoder2", "dec0": "decoder1",
    })  # fmt: skip
    return net


def check_swin_input(shape: tuple[int, ...] | torch.Size) -> None:
    bad = [s for s in shape if s % DIVISOR]
    if bad:
        raise ValueError(f"SwinUNETR needs sides divisible by {DIVISOR}; got {tuple(shape)}")


def run_swin_stages(net: nn.Module, x: torch.Tensor, after: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """SwinUNETR's forward up to the finest decoder features ``(B, F, *sp)`` (before ``net.out``);
    ``after(stage, features)`` may replace each encoder stage's output before the decoder and the
    skips use it, and sees each decoder stage's. ``net.out(run_swin_stages(net, x))`` equals ``net(x)``."""
    check_swin_input(x.shape[2:])
    step = after or (lambda _stage, f: f)
    hs = net.swinViT(x, net.normalize)
    enc0 = step("enc0", net.encoder1(x))
    enc1 = step("enc1", net.encoder2(hs[0]))
    enc2 = step("enc2", net.encoder3(hs[1]))
    enc3 = step("enc3", net.encoder4(hs[2]))
    enc4 = step("enc4", hs[3])
    f = step("bottleneck", net.encoder10(hs[4]))
    f = step("dec4", net.decoder5(f, enc4))
    f = step("dec3", net.decoder4(f, enc3))
    f = step("dec2", net.decoder3(f, enc2))
    f = step("dec1", net.decoder2(f, enc1))
    return step("dec0", net.decoder1(f, enc0))


@dataclass
class WeightReport:
    """What :func:`load_swin_weights` did; ``str()`` is the one-line report."""

    source: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"{self.loaded} tensors loaded", f"{len(self.missing)} missing", f"{len(self.unexpected)} unexpected"]
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} of another shape (skipped, e.g. {self.mismatched[0]})")
        return f"foundation weights from {self.source}: " + ", ".join(parts)


def read_weight_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a PyTorch checkpoint read with ``weights_only=True``
    (a ``state_dict``/``model``/``net`` wrapper unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise MedalloyError("no such weights file", path, "give a .safetensors, .pt or .pth file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # a truncated or foreign file
            raise MedalloyError(f"not a readable safetensors file ({type(exc).__name__})", path, "download the weights again") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickled code, a truncated file, or not a checkpoint at all
        raise MedalloyError(
            f"cannot read as tensors only ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})",
            path,
            "convert it to safetensors, or give MONAI's model_swinvit.pt",
        ) from None
    for key in ("state_dict", "model", "net", "network_weights"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        raise MedalloyError("holds no tensors", path, "give a state dict of SwinUNETR or its Swin transformer")
    return tensors


def repair_swin_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of foreign SwinUNETR weights in MONAI's SwinUNETR naming."""
    out = {}
    for key, value in tensors.items():
        k = key
        for prefix in ("module.", "model.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix) :]
        k = k.replace("swin_vit.", "swinViT.").replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")
        if k.startswith(("patch_embed.", "layers1.", "layers2.", "layers3.", "layers4.", "layers1c.")):  # the bare transformer (self-supervised weights)
            k = "swinViT." + k
        out[k] = value
    return out


def load_swin_weights(net: nn.Module, path: str | Path) -> WeightReport:
    """Load what fits of a weights file into ``net`` (a SwinUNETR); see the module docstring."""
    return load_swin_state(net, read_weight_file(path), path)


def load_swin_state(net: nn.Module, tensors: dict[str, torch.Tensor], source: str | Path) -> WeightReport:
    """Load what fits of ``tensors`` (keys repaired) into ``net``; tensors of another shape are
    skipped, nothing fitting at all is an error naming ``source``."""
    tensors = repair_swin_keys(tensors)
    own = net.state_dict()
    report = WeightReport(source=str(source))
    usable = {}
    for k, v in tensors.items():
        if k not in own:
            report.unexpected.append(k)
        elif own[k].shape != v.shape:
            report.mismatched.append(k)
        else:
            usable[k] = v
    if not usable:
        raise MedalloyError(
            f"no tensor fits this SwinUNETR ({len(report.unexpected)} unexpected, {len(report.mismatched)} of another shape)",
            source,
            "give weights of a SwinUNETR with the same spatial_dims and feature_size",
        )
    report.missing = [k for k in own if k not in usable]
    net.load_state_dict(usable, strict=False)
    report.loaded = len(usable)
    return report
