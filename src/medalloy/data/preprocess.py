"""From a raw case to network space and back: slice-axis move, resampling, normalisation, label mapping.

Network space: ``(C, *spatial)`` for a 3D plan; ``(C, S, H, W)`` for a 2D plan (``S`` = 1 for 2D
images, the slices of a volume otherwise, the sliced axis moved to position 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from medalloy.data.io import ImageMeta
from medalloy.data.network_grid import network_shape
from medalloy.data.normalize import normalize
from medalloy.errors import MedalloyError
from medalloy.planning.plan import Plan


@dataclass
class PreparedCase:
    """A case in network space, cached in memory for training or validation."""

    case_id: str
    image: np.ndarray  # float32 (C, *net_spatial) or (C, S, H, W) for 2D plans
    label: np.ndarray | None  # int16 class indices, image shape without C
    meta: ImageMeta
    source: str = "default"
    fg: dict[int, np.ndarray] = field(default_factory=dict)  # class -> (N, ndim) voxel coordinates
    pad: list[tuple[int, int]] = field(default_factory=list)  # padding added for patch sampling


def to_class_indices(label: np.ndarray, plan: Plan, path: object = None) -> np.ndarray:
    """Label values -> class indices ``0..K-1`` in ``plan.label_values`` order; unknown values raise."""
    lut_size = max(int(label.max(initial=0)), max(plan.label_values)) + 1
    lut = np.full(lut_size, -1, dtype=np.int16)
    for i, v in enumerate(plan.label_values):
        lut[v] = i
    if label.min(initial=0) < 0:
        raise MedalloyError("label map holds negative values", path, "labels must be the integers of dataset.json 'labels'")
    out = lut[label]
    if (out < 0).any():
        bad = sorted(set(np.unique(label[out < 0]).tolist()))[:5]
        raise MedalloyError(f"label values {bad} are not in the label map {plan.labels}", path, "fix the label file or add the labels to dataset.json")
    return out


def _resize(x: torch.Tensor, size: tuple[int, ...], mode: str) -> torch.Tensor:
    """``x``: (N, C, *spatial). Linear modes with antialiasing when shrinking 2D images."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest-exact")
    lin = "bilinear" if len(size) == 2 else "trilinear"
    shrink = any(s < t for s, t in zip(size, x.shape[2:]))
    return F.interpolate(x, size=size, mode=lin, align_corners=False, antialias=shrink and len(size) == 2)


def to_network_space(image: np.ndarray, label: np.ndarray | None, meta: ImageMeta, plan: Plan, path: object = None):
    """Image ``(C, *spatial)`` (+ label) from disk geometry into network space (see module doc)."""
    if plan.dim == 2:
        if meta.ndim == 3:
            if plan.slice_axis is None:
                raise MedalloyError("2D plan without slice_axis applied to a 3D image", path, "set slice_axis in the plan")
            image = np.moveaxis(image, 1 + plan.slice_axis, 1)
            label = None if label is None else np.moveaxis(label, plan.slice_axis, 0)
        elif meta.ndim == 2:
            image = image[:, None]
            label = None if label is None else label[None]
        else:
            raise MedalloyError(f"cannot apply a 2D plan to a {meta.ndim}D image", path)
    elif meta.ndim != 3:
        raise MedalloyError(f"a 3D plan needs 3D images, got {meta.ndim}D", path, "use a 2D plan for 2D data")
    image = normalize(image, plan.normalization, path)
    target = network_shape(meta, plan)
    img_t = torch.from_numpy(np.ascontiguousarray(image))
    if plan.dim == 2:
        img_t = _resize(img_t.permute(1, 0, 2, 3), target, "linear").permute(1, 0, 2, 3)
    else:
        img_t = _resize(img_t[None], target, "linear")[0]
    image = img_t.contiguous().numpy()
    if label is not None:
        lab = torch.from_numpy(to_class_indices(label, plan, path).astype(np.float32))
        lab = _resize(lab[:, None] if plan.dim == 2 else lab[None, None], target, "nearest")
        label = (lab[:, 0] if plan.dim == 2 else lab[0, 0]).round().to(torch.int16).numpy()
    return image, label


def from_network_space(probs: torch.Tensor, meta: ImageMeta, plan: Plan) -> torch.Tensor:
    """Class probabilities in network space ``(K, *net)`` / ``(K, S, H, W)`` back onto the input grid."""
    if plan.dim == 2:
        orig = list(meta.shape)
        if meta.ndim == 3:
            orig.pop(plan.slice_axis)
        out = _resize(probs.permute(1, 0, 2, 3).float(), tuple(orig), "linear").permute(1, 0, 2, 3)
        if meta.ndim == 3:
            return torch.movedim(out, 1, 1 + plan.slice_axis)
        return out[:, 0]
    return _resize(probs[None].float(), tuple(meta.shape), "linear")[0]


def foreground_coords(label: np.ndarray, num_classes: int, rng: np.random.Generator, max_per_class: int = 10000) -> dict[int, np.ndarray]:
    """A random subset of voxel coordinates per foreground class (nnU-Net's oversampling targets)."""
    out = {}
    for k in range(1, num_classes):
        idx = np.argwhere(label == k)
        if len(idx) > max_per_class:
            idx = idx[rng.choice(len(idx), max_per_class, replace=False)]
        if len(idx):
            out[k] = idx.astype(np.int32)
    return out


def pad_to_patch(image: np.ndarray, label: np.ndarray | None, patch: list[int]) -> tuple[np.ndarray, np.ndarray | None, list[tuple[int, int]]]:
    """Pad the trailing spatial axes symmetrically so every axis is at least the patch size."""
    spatial = image.shape[-len(patch) :]
    pads = [((max(p - s, 0)) // 2, max(p - s, 0) - (max(p - s, 0)) // 2) for s, p in zip(spatial, patch)]
    if not any(a or b for a, b in pads):
        return image, label, pads
    lead = image.ndim - len(patch)
    image = np.pad(image, [(0, 0)] * lead + pads)
    if label is not None:
        label = np.pad(label, [(0, 0)] * (label.ndim - len(patch)) + pads)
    return image, label, pads
