"""Networks: MONAI backbones built by small factories, plus a uniform way to read per-stage features."""

from medalloy.models.features import FeatureTap, stage_names
from medalloy.models.unet import build_unet, unet_stages

__all__ = ["FeatureTap", "build_unet", "stage_names", "unet_stages"]
