"""Tiny synthetic nnU-Net raw datasets for the planning tests, written with medalloy's own writers.

Imported by the planning test modules (pytest puts this folder on ``sys.path``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medalloy.data.dataset import RawDataset, make_dataset_json
from medalloy.data.io import ImageMeta, write_image, write_label


@dataclass
class ToyCase:
    """One case: image ``(C, *spatial)`` (RGB PNG: one file with 3 channels), optional label, spacing."""

    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, ...] | None = None
    source: str = "default"
    extra: dict = field(default_factory=dict)


def write_dataset(
    root: Path,
    cases: dict[str, ToyCase],
    channel_names: dict[str, str],
    labels: dict[str, int],
    file_ending: str,
    name: str = "Toy",
) -> RawDataset:
    """Write ``root/dataset.json``, ``imagesTr`` and ``labelsTr`` and open the result."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    one_file = file_ending == ".png"  # PNG: grey (1 channel) or RGB (3 channels) in one file
    for cid, case in cases.items():
        meta = None
        if case.spacing is not None:
            meta = ImageMeta(kind="nifti", shape=case.image.shape[1:], spacing=case.spacing)
        files = [case.image] if one_file else [case.image[c : c + 1] for c in range(case.image.shape[0])]
        for c, arr in enumerate(files):
            write_image(root / "imagesTr" / f"{cid}_{c:04d}{file_ending}", arr, meta)
        if case.label is not None:
            write_label(root / "labelsTr" / f"{cid}{file_ending}", case.label, meta)
    extras = {cid: {"source": c.source} for cid, c in cases.items()}
    spec = make_dataset_json(channel_names, labels, len(cases), file_ending, name, cases=extras)
    (root / "dataset.json").write_text(json.dumps(spec), encoding="utf-8")
    return RawDataset(root)


def forward_shape(plan) -> tuple[int, ...]:
    """Build the MONAI DynUNet a plan describes and run a zero patch through it."""
    import torch
    from monai.networks.nets import DynUNet

    net = DynUNet(
        spatial_dims=plan.dim,
        in_channels=plan.in_channels,
        out_channels=plan.num_classes,
        kernel_size=plan.network.kernels,
        strides=plan.network.strides,
        upsample_kernel_size=plan.network.strides[1:],
        filters=plan.network.filters,
        norm_name=plan.network.norm,
    ).eval()
    with torch.no_grad():
        out = net(torch.zeros(1, plan.in_channels, *plan.patch_size))
    return tuple(out.shape)
