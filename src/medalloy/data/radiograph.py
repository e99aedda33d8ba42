"""Radiographs for image-level models (pretraining, classification probes): a whole image as a
square network input, the radiographs of a folder, and a cheap batch augmentation.

The image is read like a dataset case (PNG/JPG/DICOM/NIfTI through :func:`medalloy.data.io.read_any`),
turned grey (channel mean), z-scored per image as the planner normalises X-ray channels (so an
encoder sees the same intensities in pretraining and in the expert it initialises), resized so its
long side is ``size`` (aspect kept) and padded to ``size x size`` with its own minimum (the dark
border of a radiograph).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medalloy.data.io import read_any
from medalloy.errors import MedalloyError

IMAGE_ENDINGS = (".png", ".jpg", ".jpeg", ".dcm", ".nii.gz", ".nii")


def list_images(folder: str | Path) -> list[Path]:
    """The radiographs of ``folder`` (files with one of :data:`IMAGE_ENDINGS`, any case), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MedalloyError("image folder not found", folder, "give a folder of radiographs (PNG/JPG/DICOM)")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_ENDINGS))
    if not files:
        raise MedalloyError("no images in the folder", folder, f"put radiographs ({', '.join(IMAGE_ENDINGS)}) in it")
    return files


def load_radiograph(path: str | Path, size: int) -> np.ndarray:
    """``(1, size, size)`` float32, z-scored, long side resized to ``size``, padded centred."""
    image, _meta = read_any(path)
    x = np.asarray(image, dtype=np.float32)
    x = x.mean(0) if x.ndim == 3 else x  # channels first: (C, H, W) -> (H, W)
    if x.ndim != 2:
        raise MedalloyError(f"not a 2D image (array of shape {tuple(image.shape)})", path, "give 2D radiographs (PNG/JPG)")
    if not np.isfinite(x).all():
        raise MedalloyError("image holds NaN or infinite values", path, "replace the file")
    x = (x - x.mean()) / max(float(x.std()), 1e-6)
    h, w = x.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    t = F.interpolate(torch.from_numpy(x)[None, None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)[0, 0]
    out = torch.full((size, size), float(t.min()))
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = t
    return out[None].numpy()


def augment_batch(
    images: torch.Tensor, rng: np.random.Generator, degrees: float = 7.0, scale: float = 0.1, shift: float = 0.06, contrast: float = 0.15
) -> torch.Tensor:
    """Per-image random rotation, zoom and shift (bilinear, border values repeated) and a linear
    intensity change ``a x + b`` (``a`` within ``1 +- contrast``), drawn from ``rng``: ``(B, 1, H, W)`` in and out.
    No flips: left and right mean something in a report ("left lower lobe")."""
    b = images.shape[0]
    ang = np.deg2rad(rng.uniform(-degrees, degrees, b))
    zoom = rng.uniform(1 - scale, 1 + scale, b)
    tx, ty = rng.uniform(-shift, shift, (2, b)) * 2
    cos, sin = np.cos(ang) / zoom, np.sin(ang) / zoom
    theta = torch.tensor(np.stack([np.stack([cos, -sin, tx], 1), np.stack([sin, cos, ty], 1)], 1), dtype=images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    a = torch.tensor(rng.uniform(1 - contrast, 1 + contrast, b), dtype=images.dtype).view(b, 1, 1, 1)
    off = torch.tensor(rng.uniform(-contrast, contrast, b), dtype=images.dtype).view(b, 1, 1, 1)
    return out * a + off
