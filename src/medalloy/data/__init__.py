"""Datasets in nnU-Net v2 raw format, image IO, checks, imports, splits, transforms and synthetic data."""

from medalloy.data.dataset import Case, DatasetSpec, RawDataset
from medalloy.data.io import ImageMeta, read_image, read_label, write_image, write_label

__all__ = [
    "Case",
    "DatasetSpec",
    "ImageMeta",
    "RawDataset",
    "read_image",
    "read_label",
    "write_image",
    "write_label",
]
