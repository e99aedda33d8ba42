"""A trained image-text model's view of radiograph files, in batches, unaugmented: the global
embeddings and patch tokens (zero-shot, captions, retrieval) and the U-Net encoder's pooled
bottleneck (linear probes). Images are read by :func:`~medalloy.data.radiograph.load_radiograph`,
which models/ may not import: hence here, not beside ``models/image_text.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from medalloy.data.radiograph import load_radiograph


@torch.inference_mode()
def encode_images(model: torch.nn.Module, paths: Sequence[Path], size: int, batch: int = 16, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(global embeddings (N, E), patch tokens (N, P, width))`` of the images, unaugmented."""
    device = next(model.parameters()).device
    glob, patches = [], []
    for s in tqdm(range(0, len(paths), batch), desc="encoding images", unit="batch", disable=not progress, leave=False):
        x = torch.from_numpy(np.stack([load_radiograph(p, size) for p in paths[s : s + batch]])).to(device)
        g, p = model.image_features(x)
        glob.append(g.float().cpu())
        patches.append(p.float().cpu())
    return torch.cat(glob), torch.cat(patches)


@torch.inference_mode()
def encoder_features(model: torch.nn.Module, paths: Sequence[Path], size: int, batch: int = 16, progress: bool = False) -> torch.Tensor:
    """Pooled bottleneck features ``(N, C)`` of the images, unaugmented: the U-Net encoder (``model.image``)
    that a downstream model would start from, before any projection to the text side."""
    device = next(model.parameters()).device
    feats = []
    for s in tqdm(range(0, len(paths), batch), desc="encoding images", unit="batch", disable=not progress, leave=False):
        x = torch.from_numpy(np.stack([load_radiograph(p, size) for p in paths[s : s + batch]])).to(device)
        feats.append(model.image(x)[-1].mean(dim=(2, 3)).float().cpu())
    return torch.cat(feats)
