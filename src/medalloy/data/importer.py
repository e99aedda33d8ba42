"""Import the common ``images/`` + ``masks/`` folder layout into an nnU-Net v2 raw dataset (PNG).

Layout read: ``images/NAME.jpg|.png`` and ``masks/NAME.png|.jpg`` (same stem). Layout written,
as nnU-Net's ``NaturalImage2DIO`` expects::

    out/dataset.json                      channel_names {"0": "R", "1": "G", "2": "B"} (RGB) or {"0": "image"}
    out/imagesTr/<source>_<stem>_0000.png RGB in ONE file, or grey
    out/labelsTr/<source>_<stem>.png      uint8, values 0..K

Masks are turned into label values so:

- values already within the label map: kept;
- values in ``{0, 255}``, or any JPEG mask (lossy, so values in between): ``value > 127`` becomes
  the single foreground label's value (0 elsewhere); needs exactly one foreground label;
- anything else: an error naming the mask and its values.

The import validates every input file first and writes only when all are fine; it adds cases to an
existing dataset (one call per ``source``) and updates ``dataset.json`` atomically at the end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medalloy.data.dataset import EXTENSION_KEY, RawDataset, make_dataset_json
from medalloy.data.io import JPG_ENDINGS, PNG_ENDINGS, ImageMeta, file_ending, read_any, write_image, write_label
from medalloy.errors import MedalloyError
from medalloy.jsonio import read_json, write_json_atomic

IMAGE_ENDINGS = JPG_ENDINGS + PNG_ENDINGS
RGB_CHANNELS = {"0": "R", "1": "G", "2": "B"}
DEFAULT_LABELS = {"background": 0, "foreground": 1}
DEFAULT_GREY_CHANNEL = "image"
THRESHOLD = 127  # binary masks saved as 0/255 (and JPEG noise around those) split here
_DATASET_NAME = re.compile(r"^Dataset(?P<id>\d{3})_(?P<name>.+)$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_CHANNEL_SUFFIX = re.compile(r"_(\d{4})$")
_MAX_LISTED = 5


@dataclass
class _Pair:
    """One input case: its image and mask files and the case id it becomes."""

    case_id: str
    image: Path
    mask: Path


def _listing(items: list[str]) -> str:
    """A one-line list of the first few items and how many more."""
    text = "; ".join(items[:_MAX_LISTED])
    return text + (f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def make_case_id(source: str, stem: str) -> str:
    """``<source>_<stem>`` with characters outside ``[A-Za-z0-9_-]`` replaced by ``-``.

    nnU-Net takes the last ``_NNNN`` of an image file name as its channel, so an id ending in
    ``_dddd`` (e.g. stem ``0001``) would be ambiguous: its last ``_`` becomes ``-`` (``src-0001``).
    """
    cid = _UNSAFE.sub("-", f"{source}_{stem}")
    if _CHANNEL_SUFFIX.search(cid):
        cid = cid[:-5] + "-" + cid[-4:]
    return cid


def _dataset_name(out: Path) -> str:
    """The name part of ``DatasetNNN_Name``; anything else is an error (nnU-Net finds datasets by it)."""
    m = _DATASET_NAME.match(out.name)
    if not m:
        raise MedalloyError(
            f"output folder name '{out.name}' is not DatasetNNN_Name (NNN three digits)",
            out,
            "name it like Dataset201_Polyp so nnU-Net can find it",
        )
    return m["name"]


def _image_files(folder: Path, what: str) -> dict[str, Path]:
    """``stem -> file`` for the PNG/JPG files of a folder; duplicate stems are an error."""
    if not folder.is_dir():
        raise MedalloyError(f"{what} folder not found", folder, f"give the folder that holds the {what} (PNG or JPG)")
    files: dict[str, Path] = {}
    dups: list[str] = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file() or file_ending(p) not in IMAGE_ENDINGS:
            continue
        stem = p.name[: -len(file_ending(p))]
        if stem in files:
            dups.append(f"{files[stem].name} and {p.name}")
        files[stem] = p
    if not files:
        raise MedalloyError(f"no PNG/JPG {what} found", folder, f"put the {what} there as .png or .jpg files")
    if dups:
        raise MedalloyError(f"{len(dups)} {what} share a name: {_listing(dups)}", folder, "keep one file per name")
    return files


def _pair_files(images: Path, masks: Path, source: str) -> list[_Pair]:
    """Match images and masks by stem; every image needs a mask and every mask an image."""
    img_files, mask_files = _image_files(images, "images"), _image_files(masks, "masks")
    missing = sorted(set(img_files) - set(mask_files))
    if missing:
        listed = [img_files[s].name for s in missing]
        raise MedalloyError(f"{len(missing)} image(s) have no mask of the same name: {_listing(listed)}", masks, "add the masks (same file name, .png or .jpg)")
    orphans = sorted(set(mask_files) - set(img_files))
    if orphans:
        listed = [mask_files[s].name for s in orphans]
        raise MedalloyError(f"{len(orphans)} mask(s) have no image of the same name: {_listing(listed)}", images, "add the images or remove those masks")
    pairs = [_Pair(make_case_id(source, s), img_files[s], mask_files[s]) for s in sorted(img_files)]
    seen: dict[str, str] = {}
    for pair in pairs:
        key = pair.case_id.lower()  # ids equal up to case collide on macOS/Windows file systems
        if key in seen:
            raise MedalloyError(f"'{pair.image.name}' and '{seen[key]}' give the same case id '{pair.case_id}'", images, "rename one of them")
        seen[key] = pair.image.name
    return pairs


# -- masks ---------------------------------------------------------------------------------


def _mask_to_grey(mask: np.ndarray, path: Path) -> np.ndarray:
    """``(C, H, W)`` raw mask to ``(H, W)``: an RGB mask is accepted when its channels agree."""
    if mask.shape[0] == 1:
        return mask[0]
    wide = mask.astype(np.int64)
    diff = int(np.abs(wide - wide[:1]).max()) if mask.size else 0
    # JPEG chroma noise makes the channels of a grey-looking mask differ slightly
    tolerance = 32 if file_ending(path) in JPG_ENDINGS else 0
    if diff > tolerance:
        raise MedalloyError(f"mask is a colour image ({mask.shape[0]} channels that differ)", path, "save the mask as grey with one value per label")
    return np.rint(wide.mean(axis=0)).astype(np.int64)


def convert_mask(mask: np.ndarray, path: Path, labels: dict[str, int]) -> np.ndarray:
    """A raw mask ``(C, H, W)`` as a ``uint8`` label map ``(H, W)`` with values from ``labels``.

    Values within ``labels`` are kept; ``{0, 255}`` masks and JPEG masks are thresholded at 127 to
    the one foreground label; anything else raises, naming the mask and its values.
    """
    grey = _mask_to_grey(np.asarray(mask), path)
    values = set(np.unique(grey).tolist())
    allowed = set(labels.values())
    if values <= allowed:
        return grey.astype(np.uint8)
    binary_like = values <= {0, 255} or file_ending(path) in JPG_ENDINGS
    foreground = [v for v in labels.values() if v != 0]
    if binary_like and len(foreground) == 1:
        return np.where(grey > THRESHOLD, foreground[0], 0).astype(np.uint8)
    shown = sorted(values)
    shown_text = str(shown[:10])[:-1] + (", ...]" if len(shown) > 10 else "]")
    if binary_like:
        fix = f"a 0/255 or JPEG mask needs exactly one foreground label (labels are {labels})"
    else:
        fix = f"save masks with values from the label map {labels} (or 0/255 for one foreground label)"
    raise MedalloyError(f"mask values {shown_text} are not label values", path, fix)


# -- validation ----------------------------------------------------------------------------


def _validate_pair(pair: _Pair, labels: dict[str, int]) -> tuple[int, str | None]:
    """Read one image and its mask; returns the image's channel count and a problem (or None)."""
    try:
        img, meta = read_any(pair.image)
        if img.dtype not in (np.uint8, np.uint16) or img.shape[0] not in (1, 3):
            raise MedalloyError(f"image is {img.dtype} with {img.shape[0]} channel(s)", pair.image, "save it as 8/16-bit grey or 8-bit RGB")
        if img.shape[0] == 3 and img.dtype != np.uint8:
            raise MedalloyError("16-bit RGB image", pair.image, "save it as 8-bit RGB")
        mask, mmeta = read_any(pair.mask)
        if tuple(mmeta.shape) != tuple(meta.shape):
            raise MedalloyError(
                f"mask size {mmeta.shape[1]}x{mmeta.shape[0]} differs from image size {meta.shape[1]}x{meta.shape[0]} ({pair.image.name})",
                pair.mask,
                "resize the mask to its image (nearest neighbour)",
            )
        convert_mask(mask, pair.mask, labels)
    except MedalloyError as exc:
        return 0, str(exc)
    return img.shape[0], None


def _validate_content(pairs: list[_Pair], labels: dict[str, int], progress: bool) -> bool:
    """Read every pair; raise one error listing every bad file; return True when images are RGB."""
    problems: list[str] = []
    channels: dict[int, list[str]] = {}
    for pair in tqdm(pairs, desc="checking input", unit="case", disable=not progress):
        n, problem = _validate_pair(pair, labels)
        if problem:
            problems.append(problem)
        else:
            channels.setdefault(n, []).append(pair.image.name)
    if problems:
        raise MedalloyError(
            f"{len(problems)} input file(s) cannot be imported: {_listing(problems)}", pairs[0].image.parent, "fix those files and run the import again"
        )
    if len(channels) > 1:
        grey, rgb = channels.get(1, []), channels.get(3, [])
        raise MedalloyError(
            f"{len(grey)} grey and {len(rgb)} RGB images are mixed (grey e.g. {_listing(grey[:3])})",
            pairs[0].image.parent,
            "convert all images to RGB or all to grey; nnU-Net needs one channel layout per dataset",
        )
    return 3 in channels


# -- existing dataset ----------------------------------------------------------------------


def _merge_labels(existing: dict[str, int] | None, new: dict[str, int] | None, path: Path) -> dict[str, int]:
    """The dataset's label map after this import; the same name or value meaning two things is an error."""
    if new is None:
        return dict(existing) if existing else dict(DEFAULT_LABELS)
    new = dict(new)
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 or v > 255 for v in new.values()):
        raise MedalloyError(f"label values must be integers 0..255, got {new}", path, "pass labels like {'polyp': 1}")
    if 0 not in new.values():
        new = {"background": 0, **new}
    if len(set(new.values())) != len(new):
        raise MedalloyError(f"two labels share a value in {new}", path, "give each label its own value")
    merged = dict(existing or {})
    for name, value in new.items():
        if name in merged and merged[name] != value:
            raise MedalloyError(f"label '{name}' is {merged[name]} in the dataset but {value} here", path, f"use labels {existing}")
        other = [n for n, v in merged.items() if v == value and n != name]
        if other:
            raise MedalloyError(f"value {value} is '{other[0]}' in the dataset but '{name}' here", path, f"use labels {existing}")
        merged[name] = value
    values = sorted(merged.values())
    if values != list(range(len(values))):
        # nnU-Net requires label values 0, 1, ..., K without gaps
        raise MedalloyError(f"label values {values} are not consecutive from 0", path, "number the labels 0, 1, ..., K")
    return dict(sorted(merged.items(), key=lambda kv: kv[1]))


def _load_existing(out: Path) -> dict | None:
    """The existing ``dataset.json`` as a dict (None for a new dataset)."""
    path = out / "dataset.json"
    if not path.exists():
        return None
    raw = read_json(path, "dataset.json", "", "fix it or import into a new dataset folder")
    RawDataset(out)  # validates the spec with the project's usual messages
    return raw


def _check_existing(raw: dict, out: Path, source: str, overwrite: bool) -> None:
    """The existing dataset must be PNG and not hold this source yet (unless ``overwrite``)."""
    path = out / "dataset.json"
    if raw.get("file_ending") != ".png":
        raise MedalloyError(f"dataset's file_ending is {raw.get('file_ending')!r}, the import writes .png", path, "import into a new dataset folder")
    cases = raw.get(EXTENSION_KEY, {}).get("cases", {})
    if not overwrite and any(info.get("source") == source for info in cases.values()):
        raise MedalloyError(
            f"source '{source}' is already imported into this dataset", path, "pass overwrite=True (--overwrite) to import it again, or use another source name"
        )


def _check_channels(raw: dict, out: Path, rgb: bool) -> None:
    """New images must have the existing dataset's channel layout (RGB in one file, or one grey)."""
    channel_names = raw.get("channel_names", {})
    existing_rgb = channel_names == RGB_CHANNELS
    if rgb != existing_rgb or (not rgb and len(channel_names) != 1):
        have = "RGB" if existing_rgb else f"{len(channel_names)}-channel grey"
        raise MedalloyError(
            f"dataset holds {have} images but these are {'RGB' if rgb else 'grey'}",
            out / "dataset.json",
            "convert the images or import into a new dataset folder",
        )


def _targets(out: Path, case_id: str) -> tuple[Path, Path]:
    """The image and label files a case is written to."""
    return out / "imagesTr" / f"{case_id}_0000.png", out / "labelsTr" / f"{case_id}.png"


def _check_collisions(pairs: list[_Pair], out: Path, cases: dict[str, dict], source: str, overwrite: bool) -> None:
    """No new case may clash with another source's case, nor overwrite a file without ``overwrite``."""
    others = {cid.lower(): cid for cid, info in cases.items() if info.get("source") != source}
    clashes = [f"{p.case_id} (vs {others[p.case_id.lower()]})" for p in pairs if p.case_id.lower() in others]
    if clashes:
        raise MedalloyError(f"case ids already used by another source: {_listing(clashes)}", out / "dataset.json", "use another source name")
    if overwrite:
        return
    existing = [str(t) for p in pairs for t in _targets(out, p.case_id) if t.exists()]
    if existing:
        raise MedalloyError(f"{len(existing)} output file(s) already exist: {_listing(existing)}", out, "pass overwrite=True (--overwrite) to replace them")


# -- writing -------------------------------------------------------------------------------


def _write_pair(pair: _Pair, out: Path, labels: dict[str, int]) -> None:
    """Re-read one validated pair and write it as PNG (image as read, label as uint8 values)."""
    img, meta = read_any(pair.image)
    mask, _ = read_any(pair.mask)
    label = convert_mask(mask, pair.mask, labels)
    image_path, label_path = _targets(out, pair.case_id)
    png_meta = ImageMeta(kind="png", shape=meta.shape, spacing=meta.spacing, channels=img.shape[0])
    write_image(image_path, img, png_meta)
    write_label(label_path, label, png_meta)


def _remove_stale(out: Path, cases: dict[str, dict], source: str, keep: set[str]) -> None:
    """On overwrite, drop this source's earlier cases that the new import no longer has."""
    for cid, info in list(cases.items()):
        if info.get("source") == source and cid not in keep:
            for target in _targets(out, cid):
                target.unlink(missing_ok=True)
            del cases[cid]


def import_folders(
    images: str | Path,
    masks: str | Path,
    out: str | Path,
    source: str,
    labels: dict[str, int] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    modality: str | None = None,
) -> RawDataset:
    """Import ``images/`` + ``masks/`` (same stems) as source ``source`` into the raw dataset ``out``.

    ``labels`` maps names to values (background 0 is added); default ``{"background": 0,
    "foreground": 1}``, or the existing dataset's labels. ``modality`` (optional) is recorded in
    ``dataset.json["medalloy"]["modality"]`` and names the channel of grey images. Every input is
    validated before anything is written; existing files are replaced only with ``overwrite``.
    """
    images, masks, out = Path(images), Path(masks), Path(out)
    name = _dataset_name(out)
    if not source or not str(source).strip():
        raise MedalloyError("empty source name", images, "pass source='SiteA' (the centre or collection the images come from)")
    existing = _load_existing(out)
    if existing:
        _check_existing(existing, out, source, overwrite)
    merged = _merge_labels(existing["labels"] if existing else None, labels, out / "dataset.json")
    # masks are converted with this import's own labels: a 0/255 mask maps to its one foreground
    this_labels = merged if labels is None else {k: v for k, v in merged.items() if v == 0 or k in labels}
    pairs = _pair_files(images, masks, source)
    rgb = _validate_content(pairs, this_labels, progress)
    cases: dict[str, dict] = dict(existing.get(EXTENSION_KEY, {}).get("cases", {})) if existing else {}
    if existing:
        _check_channels(existing, out, rgb)
    _check_collisions(pairs, out, cases, source, overwrite)

    for pair in tqdm(pairs, desc=f"importing {source}", unit="case", disable=not progress):
        _write_pair(pair, out, this_labels)
    _remove_stale(out, cases, source, {p.case_id for p in pairs})
    for pair in pairs:
        # on overwrite, keep what the user added to a case (e.g. its patient)
        cases[pair.case_id] = {**cases.get(pair.case_id, {}), "source": source}
    _write_dataset_json(out, existing, name, merged, rgb, cases, modality)
    return RawDataset(out)


def _count_cases(out: Path) -> int:
    """Cases on disk (``imagesTr/*_0000.png``), which also counts any not listed under "medalloy"."""
    folder = out / "imagesTr"
    return sum(1 for p in folder.glob("*_0000.png") if not p.name.startswith(".")) if folder.is_dir() else 0


def _write_dataset_json(out: Path, existing: dict | None, name: str, labels: dict[str, int], rgb: bool, cases: dict[str, dict], modality: str | None) -> None:
    """Write ``dataset.json`` atomically, keeping any extra fields of an existing one."""
    ext = dict(existing.get(EXTENSION_KEY, {})) if existing else {}
    modality = modality or ext.get("modality")
    channels = RGB_CHANNELS if rgb else (existing["channel_names"] if existing else {"0": modality or DEFAULT_GREY_CHANNEL})
    kept = {k: v for k, v in (existing or {}).items() if k not in ("channel_names", "labels", "numTraining", "file_ending", "name", EXTENSION_KEY)}
    data = make_dataset_json(
        channel_names=channels,
        labels=labels,
        num_training=_count_cases(out),
        file_ending=".png",
        name=existing.get("name", name) if existing else name,
        cases=dict(sorted(cases.items())),
        modality=modality,
        **kept,
    )
    data[EXTENSION_KEY] = {**ext, **data[EXTENSION_KEY]}
    write_json_atomic(out / "dataset.json", data)
