"""Per-channel intensity normalisation as a plan says (numpy only: training, prediction and the
torch-free deployment runtime share it)."""

from __future__ import annotations

import numpy as np

from medalloy.errors import MedalloyError
from medalloy.planning.plan import ChannelNorm


def normalize(image: np.ndarray, norms: list[ChannelNorm], path: object = None) -> np.ndarray:
    """Per-channel normalisation as the plan says (see :class:`~medalloy.planning.plan.ChannelNorm`)."""
    if image.shape[0] != len(norms):
        raise MedalloyError(f"image has {image.shape[0]} channels, the plan expects {len(norms)}", path, "predict with a model trained on this kind of image")
    if not np.all(np.isfinite(image)):
        raise MedalloyError("image holds NaN or inf values", path, "fix or remove the case (`medalloy data check` lists such files)")
    out = np.empty(image.shape, dtype=np.float32)
    for c, norm in enumerate(norms):
        x = image[c].astype(np.float32, copy=False)
        if norm.scheme == "ct":
            x = np.clip(x, norm.clip_low, norm.clip_high)
            x = (x - norm.mean) / max(norm.std or 1.0, 1e-8)
        elif norm.scheme == "zscore":
            x = (x - x.mean()) / max(float(x.std()), 1e-8)
        elif norm.scheme == "rgb":
            x = x / 255.0
        elif norm.scheme == "rescale01":
            x = x - x.min()
            x = x / max(float(x.max()), 1e-8)
        out[c] = x
    return out
