"""Image/label IO: exact round trips (NIfTI geometry, PNG modes, DICOM axis order) and every read error."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest

from medalloy.data.io import ImageMeta, file_ending, read_image, read_label, write_image, write_label
from medalloy.errors import MedalloyError


def _rotated_affine(spacing: tuple[float, float, float]) -> np.ndarray:
    """A voxel-to-world affine with a 30 degree rotation about z, anisotropic zooms and a translation."""
    th = math.radians(30.0)
    rot = np.array([[math.cos(th), -math.sin(th), 0.0], [math.sin(th), math.cos(th), 0.0], [0.0, 0.0, 1.0]])
    aff = np.eye(4)
    aff[:3, :3] = rot * np.asarray(spacing)[None, :]
    aff[:3, 3] = [10.5, -20.25, 33.0]
    return aff


def _no_temp_files(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")]


def _assert_one_line_naming(exc: pytest.ExceptionInfo, path: Path) -> None:
    msg = str(exc.value)
    assert "\n" not in msg
    assert str(path) in msg


# -- NIfTI -----------------------------------------------------------------------------------------
def test_nifti_round_trip_keeps_array_spacing_and_rotated_affine(tmp_path):
    spacing = (0.7, 0.7, 3.0)
    affine = _rotated_affine(spacing)
    rng = np.random.default_rng(1)
    image = rng.normal(size=(1, 5, 6, 7)).astype(np.float32)
    meta = ImageMeta(kind="nifti", shape=(5, 6, 7), spacing=spacing, affine=affine.tolist())
    write_image(tmp_path / "img.nii.gz", image, meta)
    data, got = read_image(tmp_path / "img.nii.gz")
    assert data.dtype == np.float32 and data.shape == (1, 5, 6, 7)
    assert np.array_equal(data, image)
    # NIfTI stores pixdim and the sform in float32: the round trip is exact at that precision.
    assert got.spacing == tuple(float(np.float32(s)) for s in spacing)
    assert np.array_equal(np.asarray(got.affine), affine.astype(np.float32).astype(np.float64))
    assert got.shape == (5, 6, 7) and got.kind == "nifti" and got.channels == 1
    _no_temp_files(tmp_path)


def test_nifti_label_round_trip_and_multi_file_channels(tmp_path):
    spacing = (0.7, 0.7, 3.0)
    meta = ImageMeta(kind="nifti", shape=(4, 3, 2), spacing=spacing, affine=_rotated_affine(spacing).tolist())
    label = np.arange(24).reshape(4, 3, 2) % 3
    write_label(tmp_path / "lab.nii.gz", label, meta)
    got, lmeta = read_label(tmp_path / "lab.nii.gz")
    assert got.dtype == np.int64 and np.array_equal(got, label)
    assert np.allclose(lmeta.affine, meta.affine, atol=1e-6)
    # one file per channel (nnU-Net _0000, _0001) stacks in file order
    write_image(tmp_path / "c_0000.nii.gz", np.full((1, 4, 3, 2), 1.0, np.float32), meta)
    write_image(tmp_path / "c_0001.nii.gz", np.full((1, 4, 3, 2), 2.0, np.float32), meta)
    data, imeta = read_image([tmp_path / "c_0000.nii.gz", tmp_path / "c_0001.nii.gz"])
    assert data.shape == (2, 4, 3, 2) and imeta.channels == 2
    assert data[0].max() == 1.0 and data[1].min() == 2.0
    _no_temp_files(tmp_path)


def test_nifti_without_meta_uses_unit_spacing(tmp_path):
    write_image(tmp_path / "plain.nii", np.zeros((1, 2, 3, 4), np.float32))
    _, meta = read_image(tmp_path / "plain.nii")
    assert meta.spacing == (1.0, 1.0, 1.0) and meta.shape == (2, 3, 4)


# -- PNG -------------------------------------------------------------------------------------------
def test_rgb_png_gives_three_channels(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, size=(3, 6, 9)).astype(np.uint8)
    write_image(tmp_path / "rgb.png", rgb)
    data, meta = read_image(tmp_path / "rgb.png")
    assert data.shape == (3, 6, 9) and meta.channels == 3 and meta.shape == (6, 9)
    assert np.array_equal(data, rgb.astype(np.float32))
    assert meta.spacing == (1.0, 1.0) and meta.kind == "png"


def test_grey_png_gives_one_channel(tmp_path):
    grey = np.arange(6 * 9, dtype=np.uint8).reshape(1, 6, 9)
    write_image(tmp_path / "grey.png", grey)
    data, meta = read_image(tmp_path / "grey.png")
    assert data.shape == (1, 6, 9) and meta.channels == 1
    assert np.array_equal(data[0], grey[0].astype(np.float32))


def test_uint16_label_png_round_trip(tmp_path):
    label = np.zeros((5, 7), dtype=np.int64)
    label[1:3, 2:5] = 1000  # >255 forces a 16-bit PNG
    label[4, 6] = 300
    write_label(tmp_path / "lab.png", label)
    got, meta = read_label(tmp_path / "lab.png")
    assert got.dtype == np.int64 and np.array_equal(got, label)
    assert meta.shape == (5, 7)
    small = np.array([[0, 1], [2, 255]])
    write_label(tmp_path / "small.png", small)
    assert np.array_equal(read_label(tmp_path / "small.png")[0], small)
    _no_temp_files(tmp_path)


# -- DICOM -----------------------------------------------------------------------------------------
def _write_dicom_series(folder: Path, arr_zyx: np.ndarray, spacing_xy: tuple[float, float], dz: float) -> None:
    import SimpleITK as sitk

    folder.mkdir()
    uid = "1.2.826.0.1.3680043.2.1125.1.424242"
    for z in range(arr_zyx.shape[0]):
        sl = sitk.GetImageFromArray(arr_zyx[z])
        sl.SetSpacing(spacing_xy)
        tags = {
            "0020|000e": uid,
            "0020|0032": f"1\\2\\{3 + dz * z}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0013": str(z + 1),
            "0018|0050": str(dz),
            "0008|0060": "CT",
        }
        for k, v in tags.items():
            sl.SetMetaData(k, v)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(sl)


def test_dicom_series_reads_in_xyz_order_with_spacing(tmp_path):
    nz, ny, nx = 4, 5, 6
    arr = np.arange(nz * ny * nx, dtype=np.int16).reshape(nz, ny, nx)
    _write_dicom_series(tmp_path / "series", arr, (0.8, 0.6), 2.5)
    data, meta = read_image(tmp_path / "series")
    # (x, y, z) like nibabel: SimpleITK's (z, y, x) array transposed
    assert data.shape == (1, nx, ny, nz) and meta.shape == (nx, ny, nz)
    assert np.array_equal(data[0], arr.transpose(2, 1, 0).astype(np.float32))
    assert meta.spacing == pytest.approx((0.8, 0.6, 2.5))
    aff = np.asarray(meta.affine)
    # LPS -> RAS flips x and y; origin (1, 2, 3) becomes (-1, -2, 3)
    assert np.allclose(aff, [[-0.8, 0, 0, -1], [0, -0.6, 0, -2], [0, 0, 2.5, 3], [0, 0, 0, 1]])
    assert meta.kind == "dicom"


def test_single_dicom_file_is_2d_with_row_col_spacing(tmp_path):
    import SimpleITK as sitk

    arr = np.arange(12, dtype=np.int16).reshape(3, 4)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.5, 0.25))  # (x = columns, y = rows)
    sitk.WriteImage(img, str(tmp_path / "one.dcm"))
    data, meta = read_image(tmp_path / "one.dcm")
    assert data.shape == (1, 3, 4) and np.array_equal(data[0], arr.astype(np.float32))
    assert meta.spacing == pytest.approx((0.25, 0.5))  # rows, columns


def test_empty_dicom_folder_raises(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedalloyError, match="no DICOM series") as exc:
        read_image(tmp_path / "empty")
    _assert_one_line_naming(exc, tmp_path / "empty")


# -- errors ----------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    p = tmp_path / "nope.nii.gz"
    with pytest.raises(MedalloyError, match="not found") as exc:
        read_image(p)
    _assert_one_line_naming(exc, p)


@pytest.mark.parametrize("name", ["bad.png", "bad.nii.gz", "bad.dcm", "bad.jpg"])
def test_random_bytes_raise(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(np.random.default_rng(3).integers(0, 256, 400, dtype=np.uint8).tobytes())
    with pytest.raises(MedalloyError, match="cannot read") as exc:
        read_image(p)
    _assert_one_line_naming(exc, p)


def test_truncated_png_and_nifti_raise(tmp_path):
    write_image(tmp_path / "full.png", np.random.default_rng(4).integers(0, 256, (3, 32, 32)).astype(np.uint8))
    raw = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(MedalloyError) as exc:
        read_image(tmp_path / "cut.png")
    _assert_one_line_naming(exc, tmp_path / "cut.png")

    write_image(tmp_path / "full.nii.gz", np.random.default_rng(5).normal(size=(1, 8, 8, 8)).astype(np.float32))
    raw = (tmp_path / "full.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(MedalloyError, match="cannot read NIfTI") as exc:
        read_image(tmp_path / "cut.nii.gz")
    _assert_one_line_naming(exc, tmp_path / "cut.nii.gz")
    # a valid gzip holding a too-short NIfTI payload
    payload = gzip.decompress(raw)
    (tmp_path / "short.nii.gz").write_bytes(gzip.compress(payload[:400]))
    with pytest.raises(MedalloyError) as exc:
        read_image(tmp_path / "short.nii.gz")
    _assert_one_line_naming(exc, tmp_path / "short.nii.gz")


def test_unsupported_ending(tmp_path):
    p = tmp_path / "scan.bmp"
    p.write_bytes(b"BM0000")
    with pytest.raises(MedalloyError, match="unsupported file type '.bmp'") as exc:
        read_image(p)
    _assert_one_line_naming(exc, p)


def test_nan_label(tmp_path):
    lab = np.zeros((1, 3, 3, 3), np.float32)
    lab[0, 1, 1, 1] = np.nan
    write_image(tmp_path / "nan.nii.gz", lab)
    with pytest.raises(MedalloyError, match="NaN") as exc:
        read_label(tmp_path / "nan.nii.gz")
    _assert_one_line_naming(exc, tmp_path / "nan.nii.gz")


def test_non_integer_label(tmp_path):
    lab = np.zeros((1, 3, 3, 3), np.float32)
    lab[0, 0, 0, 0] = 1.5
    write_image(tmp_path / "frac.nii.gz", lab)
    with pytest.raises(MedalloyError, match="non-integer") as exc:
        read_label(tmp_path / "frac.nii.gz")
    _assert_one_line_naming(exc, tmp_path / "frac.nii.gz")
    # integral floats are accepted and converted
    lab[0, 0, 0, 0] = 2.0
    write_image(tmp_path / "ok.nii.gz", lab)
    got, _ = read_label(tmp_path / "ok.nii.gz")
    assert got.dtype == np.int64 and got[0, 0, 0] == 2 and got.sum() == 2


def test_multi_channel_label(tmp_path):
    write_image(tmp_path / "rgb.png", np.zeros((3, 4, 4), np.uint8))
    with pytest.raises(MedalloyError, match="3 channels") as exc:
        read_label(tmp_path / "rgb.png")
    _assert_one_line_naming(exc, tmp_path / "rgb.png")


def test_channel_shape_mismatch(tmp_path):
    write_image(tmp_path / "a_0000.nii.gz", np.zeros((1, 4, 4, 4), np.float32))
    write_image(tmp_path / "a_0001.nii.gz", np.zeros((1, 4, 4, 5), np.float32))
    with pytest.raises(MedalloyError, match="differs") as exc:
        read_image([tmp_path / "a_0000.nii.gz", tmp_path / "a_0001.nii.gz"])
    _assert_one_line_naming(exc, tmp_path / "a_0001.nii.gz")


def test_write_errors_leave_no_temp_file(tmp_path):
    with pytest.raises(MedalloyError, match="2 channels") as exc:
        write_image(tmp_path / "two.png", np.zeros((2, 4, 4), np.uint8))
    _assert_one_line_naming(exc, tmp_path / "two.png")
    with pytest.raises(MedalloyError, match="'.bmp'"):
        write_image(tmp_path / "x.bmp", np.zeros((1, 4, 4), np.uint8))
    with pytest.raises(MedalloyError, match="2 channels"):
        write_image(tmp_path / "two.nii.gz", np.zeros((2, 4, 4, 4), np.float32))
    assert list(tmp_path.iterdir()) == []


def test_atomic_overwrite_replaces_content(tmp_path):
    write_label(tmp_path / "l.png", np.zeros((3, 3), int))
    write_label(tmp_path / "l.png", np.ones((3, 3), int))
    assert read_label(tmp_path / "l.png")[0].sum() == 9
    assert [p.name for p in tmp_path.iterdir()] == ["l.png"]


def test_file_ending():
    assert file_ending("A/b_0000.NII.GZ") == ".nii.gz"
    assert file_ending("x.nii") == ".nii"
    assert file_ending("x.tar.gz") == ".gz"


def test_palette_label_png_reads_class_indices(tmp_path):
    from PIL import Image

    idx = np.zeros((6, 8), dtype=np.uint8)
    idx[1:3, 2:5] = 1
    idx[4:, 6:] = 2
    im = Image.fromarray(idx, mode="P")
    im.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (256 * 3 - 9))
    im.save(tmp_path / "lab.png")
    lab, meta = read_label(tmp_path / "lab.png")
    assert np.array_equal(lab, idx)
    img, _ = read_image(tmp_path / "lab.png")  # as an image, the palette colours are what is shown
    assert img.shape == (3, 6, 8) and img[0, 1, 2] == 128
