"""Training augmentation from MONAI (spatial + intensity), nnU-Net's choice of transforms and odds."""

from __future__ import annotations

import math
from typing import Any

from monai import transforms as mt
from pydantic import BaseModel, ConfigDict, model_validator

# Named settings, as nnU-Net names its stronger-augmentation trainers (nnUNetTrainerDA5): "strong"
# applies every transform more often and wider, intensity above all (what differs between centres).
# Measured for distillation students on an unseen centre: docs/methods/distillation.md, "Stronger
# augmentation".
AUGMENT_PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "strong": {
        "p_affine": 0.5, "rotate_degrees": 20.0, "scale": (0.7, 1.4), "p_noise": 0.2, "p_blur": 0.3, "blur_sigma": (0.5, 1.5),
        "p_brightness": 0.5, "brightness": 0.3, "p_contrast": 0.5, "gamma": (0.5, 2.0),
    },
}  # fmt: skip


class AugmentConfig(BaseModel):
    """Probabilities and ranges of the training augmentations (``enabled: false`` turns all off).

    A preset name stands for its settings (``augment: strong`` in YAML, ``AugmentConfig.model_validate("strong")``);
    ``{"preset": "strong", "p_blur": 0.5}`` starts from a preset and changes some."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = {"preset": value}
        if isinstance(value, dict) and "preset" in value:
            rest = {k: v for k, v in value.items() if k != "preset"}
            name = value["preset"]
            if not isinstance(name, str) or name not in AUGMENT_PRESETS:
                raise ValueError(f"unknown augmentation preset {name!r}; use one of {', '.join(AUGMENT_PRESETS)}")
            value = {**AUGMENT_PRESETS[name], **rest}
        return value

    enabled: bool = True
    p_affine: float = 0.2
    rotate_degrees: float = 15.0
    scale: tuple[float, float] = (0.85, 1.25)
    mirror: bool = True
    p_noise: float = 0.1
    noise_std: float = 0.1
    p_blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_brightness: float = 0.15
    brightness: float = 0.25
    p_contrast: float = 0.15
    gamma: tuple[float, float] = (0.7, 1.5)


def training_transforms(dim: int, cfg: AugmentConfig) -> mt.Compose | None:
    """A dict transform over ``{"image": (C, *patch), "label": (1, *patch)}`` tensors, or None when off."""
    if not cfg.enabled:
        return None
    rad = math.radians(cfg.rotate_degrees)
    rotate = (rad,) if dim == 2 else (rad, rad, rad)
    scale = (cfg.scale[0] - 1.0, cfg.scale[1] - 1.0)
    ops: list = [
        mt.RandAffined(
            keys=["image", "label"],
            prob=cfg.p_affine,
            rotate_range=rotate,
            scale_range=(scale,) * dim,
            mode=("bilinear", "nearest"),
            padding_mode="zeros",
        ),
    ]
    if cfg.mirror:
        ops += [mt.RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=a) for a in range(dim)]
    ops += [
        mt.RandGaussianNoised(keys="image", prob=cfg.p_noise, std=cfg.noise_std),
        mt.RandGaussianSmoothd(keys="image", prob=cfg.p_blur, sigma_x=cfg.blur_sigma, sigma_y=cfg.blur_sigma, sigma_z=cfg.blur_sigma),
        mt.RandScaleIntensityd(keys="image", prob=cfg.p_brightness, factors=cfg.brightness),
        mt.RandAdjustContrastd(keys="image", prob=cfg.p_contrast, gamma=cfg.gamma),
    ]
    return mt.Compose(ops)
