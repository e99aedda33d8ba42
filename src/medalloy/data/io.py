"""Image and label IO for the formats medalloy reads: PNG/JPG (2D, grey or RGB), NIfTI (3D) and DICOM.

Array conventions (the same everywhere in medalloy):
- images are ``float32`` arrays of shape ``(C, *spatial)``; labels are integer arrays ``(*spatial)``;
- 2D spatial axes are ``(H, W)`` (rows, columns) as in the PNG; 3D spatial axes are the NIfTI voxel
  axes ``(i, j, k)`` as nibabel returns them, so the affine applies unchanged;
- ``ImageMeta.spacing`` has one entry per spatial axis, in array order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from medalloy.errors import MedalloyError
from medalloy.jsonio import atomic_path

PNG_ENDINGS = (".png",)
JPG_ENDINGS = (".jpg", ".jpeg")
NIFTI_ENDINGS = (".nii.gz", ".nii")
DICOM_ENDINGS = (".dcm",)
READABLE_ENDINGS = PNG_ENDINGS + JPG_ENDINGS + NIFTI_ENDINGS + DICOM_ENDINGS


@dataclass
class ImageMeta:
    """Geometry of an image as read from disk, enough to write a prediction back in the same frame."""

    kind: str  # "png" | "nifti" | "dicom"
    shape: tuple[int, ...]  # spatial shape
    spacing: tuple[float, ...]  # per spatial axis, array order
    affine: list[list[float]] | None = None  # 4x4 voxel-to-world (RAS) for NIfTI/DICOM
    channels: int = 1
    extra: dict = field(default_factory=dict)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "shape": list(self.shape),
            "spacing": [float(s) for s in self.spacing],
            "affine": self.affine,
            "channels": self.channels,
        }


def file_ending(path: str | Path) -> str:
    """The ending that decides the format (``.nii.gz`` counts as one ending)."""
    name = str(path).lower()
    for ending in READABLE_ENDINGS:
        if name.endswith(ending):
            return ending
    return Path(name).suffix


def _kind(path: Path) -> str:
    ending = file_ending(path)
    if ending in PNG_ENDINGS + JPG_ENDINGS:
        return "png"
    if ending in NIFTI_ENDINGS:
        return "nifti"
    if ending in DICOM_ENDINGS or path.is_dir():
        return "dicom"
    raise MedalloyError(
        f"unsupported file type '{ending}'",
        path,
        "use PNG/JPG (2D), NIfTI .nii.gz (3D) or DICOM .dcm",
    )


def _read_natural(path: Path, label: bool = False) -> tuple[np.ndarray, ImageMeta]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            # A palette label map (Pascal VOC style) stores class indices; its colours are only for display.
            if mode in ("RGBA", "CMYK", "YCbCr", "LA") or (mode == "P" and not label):
                im = im.convert("RGB" if mode != "LA" else "L")
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise MedalloyError(f"cannot read image ({exc.__class__.__name__})", path, "replace the file with a valid PNG/JPG") from None
    if arr.ndim == 2:
        data = arr[None]
    elif arr.ndim == 3:
        data = np.moveaxis(arr, -1, 0)
    else:
        raise MedalloyError(f"unexpected image array of shape {arr.shape}", path, "save it as a grey or RGB image")
    meta = ImageMeta(kind="png", shape=tuple(data.shape[1:]), spacing=(1.0, 1.0), channels=data.shape[0])
    return data, meta


def _read_nifti(path: Path) -> tuple[np.ndarray, ImageMeta]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        arr = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for truncated/corrupt files
        raise MedalloyError(f"cannot read NIfTI ({exc.__class__.__name__}: {exc})", path, "replace the file with a valid .nii.gz") from None
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise MedalloyError(
            f"NIfTI has {arr.ndim} dimensions (shape {arr.shape})",
            path,
            "store one 3D volume per channel file (nnU-Net's _0000, _0001 ... files)",
        )
    zooms = tuple(float(z) for z in img.header.get_zooms()[: arr.ndim])
    meta = ImageMeta(
        kind="nifti",
        shape=tuple(int(s) for s in arr.shape),
        spacing=zooms,
        affine=np.asarray(img.affine, dtype=float).tolist(),
        channels=1,
    )
    return arr[None], meta


def _read_dicom(path: Path) -> tuple[np.ndarray, ImageMeta]:
    import SimpleITK as sitk

    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            files = reader.GetGDCMSeriesFileNames(str(path))
            if not files:
                raise MedalloyError("no DICOM series in folder", path, "point to a folder holding one series of .dcm files")
            reader.SetFileNames(files)
            img = reader.Execute()
        else:
            img = sitk.ReadImage(str(path))
    except MedalloyError:
        raise
    except Exception as exc:
        raise MedalloyError(f"cannot read DICOM ({exc})".splitlines()[0], path, "replace it with a valid DICOM file or series") from None
    arr = sitk.GetArrayFromImage(img)  # (z, y, x) or (1, y, x)
    spacing_xyz = img.GetSpacing()
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr2d = arr[0]
        if arr2d.ndim == 3:  # RGB radiograph / photo
            data = np.moveaxis(arr2d, -1, 0)
        else:
            data = arr2d[None]
        meta = ImageMeta(kind="dicom", shape=tuple(data.shape[1:]), spacing=(float(spacing_xyz[1]), float(spacing_xyz[0])), channels=data.shape[0])
        return data, meta
    vol = np.transpose(arr, (2, 1, 0))  # to (x, y, z) like nibabel
    direction = np.asarray(img.GetDirection(), dtype=float).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(spacing_xyz, dtype=float)[None, :]
    lps[:3, 3] = img.GetOrigin()
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM is LPS, NIfTI is RAS
    meta = ImageMeta(kind="dicom", shape=tuple(vol.shape), spacing=tuple(float(s) for s in spacing_xyz), affine=ras.tolist())
    return vol[None], meta


def read_any(path: str | Path, label: bool = False) -> tuple[np.ndarray, ImageMeta]:
    """Read one file: returns the raw array ``(C, *spatial)`` (original dtype) and its geometry.
    ``label``: palette PNGs give their indices rather than their colours."""
    path = Path(path)
    if not path.exists():
        raise MedalloyError("file not found", path, "check the path or the dataset's file_ending")
    kind = _kind(path)
    if kind == "png":
        return _read_natural(path, label)
    if kind == "nifti":
        return _read_nifti(path)
    return _read_dicom(path)


def read_image(paths: str | Path | Sequence[str | Path]) -> tuple[np.ndarray, ImageMeta]:
    """Read an image from one file or from one file per channel (nnU-Net's ``_0000``, ``_0001`` ...).

    Returns ``float32`` of shape ``(C, *spatial)``; an RGB file contributes three channels.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    arrays, meta = [], None
    for p in paths:
        arr, m = read_any(p)
        if meta is None:
            meta = m
        elif tuple(m.shape) != tuple(meta.shape):
            raise MedalloyError(
                f"channel shape {m.shape} differs from the first channel's {meta.shape}",
                p,
                "resample all channels of a case to one grid",
            )
        arrays.append(arr.astype(np.float32, copy=False))
    if meta is None:
        raise MedalloyError("no image files given")
    data = np.concatenate(arrays, axis=0)
    meta.channels = data.shape[0]
    return data, meta


def _natural_geometry(path: Path) -> ImageMeta:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:  # reads the header only
            width, height, mode = im.width, im.height, im.mode
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise MedalloyError(f"cannot read image ({exc.__class__.__name__})", path, "replace the file with a valid PNG/JPG") from None
    channels = 1 if mode in ("1", "L", "I", "I;16", "F", "LA") else 3  # as _read_natural converts them
    return ImageMeta(kind="png", shape=(height, width), spacing=(1.0, 1.0), channels=channels)


def _nifti_geometry(path: Path) -> ImageMeta:
    import nibabel as nib

    try:
        header = nib.load(str(path)).header
    except Exception as exc:
        raise MedalloyError(f"cannot read NIfTI ({exc.__class__.__name__}: {exc})", path, "replace the file with a valid .nii.gz") from None
    shape = tuple(int(s) for s in header.get_data_shape())
    if len(shape) == 4 and shape[-1] == 1:
        shape = shape[:3]
    return ImageMeta(kind="nifti", shape=shape, spacing=tuple(float(z) for z in header.get_zooms()[: len(shape)]), channels=1)


def read_geometry(paths: str | Path | Sequence[str | Path]) -> ImageMeta:
    """The geometry :func:`read_image` would give (shape, spacing, kind, channels; no affine),
    from the headers of PNG/JPEG and NIfTI files without decoding their pixels."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    metas = []
    for p in map(Path, paths):
        if not p.exists():
            raise MedalloyError("file not found", p, "check the path or the dataset's file_ending")
        kind = _kind(p)
        metas.append(_natural_geometry(p) if kind == "png" else _nifti_geometry(p) if kind == "nifti" else _read_dicom(p)[1])
    if not metas:
        raise MedalloyError("no image files given")
    return replace(metas[0], channels=sum(m.channels for m in metas))


def read_label(path: str | Path) -> tuple[np.ndarray, ImageMeta]:
    """Read a label map: integer array ``(*spatial)``. Non-integer values raise."""
    arr, meta = read_any(path, label=True)
    if arr.shape[0] != 1:
        raise MedalloyError(f"label map has {arr.shape[0]} channels", path, "save labels as a single-channel (grey) image")
    lab = arr[0]
    if not np.issubdtype(lab.dtype, np.integer):
        if not np.all(np.isfinite(lab)):
            raise MedalloyError("label map holds NaN or inf", path, "re-export the labels as integers")
        rounded = np.rint(lab)
        if not np.allclose(rounded, lab):
            raise MedalloyError("label map holds non-integer values", path, "re-export the labels as integers (nearest-neighbour when resampling)")
        lab = rounded
    return lab.astype(np.int64, copy=False), meta


def write_label(path: str | Path, label: np.ndarray, meta: ImageMeta | None = None) -> None:
    """Write a label map in the format given by the path's ending, keeping ``meta``'s geometry."""
    path = Path(path)
    label = np.asarray(label)
    dtype = np.uint8 if label.size == 0 or label.max() < 256 else np.uint16
    _write_array(path, label.astype(dtype)[None], meta)


def write_image(path: str | Path, image: np.ndarray, meta: ImageMeta | None = None) -> None:
    """Write an image ``(C, *spatial)``: PNG takes 1 (grey) or 3 (RGB) uint8 channels; NIfTI one channel."""
    _write_array(Path(path), np.asarray(image), meta)


def _write_array(path: Path, data: np.ndarray, meta: ImageMeta | None) -> None:
    ending = file_ending(path)
    # the temporary file keeps the whole ending (.nii.gz): nibabel picks compression from it
    with atomic_path(path, suffix=ending) as tmp:
        if ending in PNG_ENDINGS:
            from PIL import Image

            if data.shape[0] == 1:
                arr = data[0]
                mode = "I;16" if arr.dtype == np.uint16 else "L"
                if mode == "L":
                    arr = arr.astype(np.uint8)
            elif data.shape[0] == 3:
                arr, mode = np.moveaxis(data, 0, -1).astype(np.uint8), "RGB"
            else:
                raise MedalloyError(f"cannot write {data.shape[0]} channels to PNG", path, "write one file per channel")
            # Low zlib effort: several times faster to write, files ~10% larger, pixels identical.
            Image.fromarray(np.ascontiguousarray(arr)).save(tmp, format="PNG", compress_level=1)
        elif ending in NIFTI_ENDINGS:
            import nibabel as nib

            if data.shape[0] != 1:
                raise MedalloyError(f"cannot write {data.shape[0]} channels to one NIfTI", path, "write one file per channel")
            affine = np.asarray(meta.affine, dtype=float) if meta is not None and meta.affine is not None else None
            if affine is None:
                spacing = meta.spacing if meta is not None else (1.0,) * (data.ndim - 1)
                affine = np.diag(list(spacing[:3]) + [1.0] * (4 - min(3, len(spacing))))
            img = nib.Nifti1Image(data[0], affine)
            img.header.set_data_dtype(data.dtype)
            if meta is not None:
                img.header.set_zooms(tuple(meta.spacing[: data.ndim - 1]))
            nib.save(img, str(tmp))
        else:
            raise MedalloyError(f"cannot write '{ending}' files", path, "use .png or .nii.gz")
