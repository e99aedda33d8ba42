"""Radiograph loading and listing (``data/radiograph.py``) and the radiograph commands' CSV writer: values a
wrong implementation would miss. The commands themselves run end to end in ``tests/recipes/test_pretrain.py``."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from medalloy.data.radiograph import augment_batch, list_images, load_radiograph
from medalloy.errors import MedalloyError
from medalloy.radiograph_tasks import _write_csv


def test_load_radiograph_keeps_aspect_and_zscores(tmp_path):
    img = np.zeros((40, 80), np.uint8)
    img[:, 40:] = 200  # right half bright
    Image.fromarray(img).save(tmp_path / "a.png")
    x = load_radiograph(tmp_path / "a.png", 32)
    assert x.shape == (1, 32, 32) and x.dtype == np.float32
    # 80 wide -> 32, 40 high -> 16 rows centred: rows 0-7 and 24-31 are padding at the image's minimum
    assert np.allclose(x[0, :8], x.min()) and np.allclose(x[0, 24:], x.min())
    body = x[0, 8:24]
    assert np.isclose(body.mean(), 0, atol=1e-5) and np.isclose(body.std(), 1, atol=0.03)  # z-scored before resizing
    assert body[:, :15].max() < 0 < body[:, 17:].min()  # left dark, right bright: no flip
    rgb = np.stack([img, img, img], -1)
    Image.fromarray(rgb).save(tmp_path / "b.png")
    assert np.allclose(load_radiograph(tmp_path / "b.png", 32), x, atol=1e-5)


def test_augment_is_seeded_and_identity_at_zero():
    x = torch.randn(3, 1, 16, 16)
    a = augment_batch(x, np.random.default_rng(1))
    assert torch.equal(a, augment_batch(x, np.random.default_rng(1))) and not torch.allclose(a, x)
    same = augment_batch(x, np.random.default_rng(1), degrees=0, scale=0, shift=0, contrast=0)
    assert torch.allclose(same, x, atol=1e-5)


def test_list_images_errors(tmp_path):
    with pytest.raises(MedalloyError, match="image folder not found"):
        list_images(tmp_path / "none")
    with pytest.raises(MedalloyError, match="no images"):
        list_images(tmp_path)


def test_write_csv_round_trips_and_replaces_the_file_whole(tmp_path):
    out = tmp_path / "scores.csv"
    out.write_text("an older, longer file\n" * 5, encoding="utf-8")
    rows = [["a.png", "pleural effusion, left", "0.9000"], ["b.png", 'a "quoted" word; ünïcode', "0.1000"]]
    assert _write_csv(out, ["image", "impression", "p"], rows) == out
    with open(out, newline="", encoding="utf-8") as f:
        assert list(csv.reader(f)) == [["image", "impression", "p"], *rows]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.csv"]  # no temporary file left beside it
