"""Check an nnU-Net v2 raw dataset and report every problem at once, each with its fix.

:func:`check_dataset` never stops at the first problem: a user fixing a dataset wants the whole
list, not one error per run. It checks, in order:

1. ``dataset.json``: present, valid JSON, the required fields (``channel_names``, ``labels``,
   ``file_ending``), label values that are single integers, unique and consecutive from 0;
2. the folders: ``imagesTr/`` present; files named ``CASE_XXXX<ending>`` (images) and ``CASE<ending>``
   (labels); every case has its channel files ``_0000`` .. ``_{n-1}`` (RGB lives in one ``_0000``
   file when the channels are named R, G, B) and a label; no label without an image; no duplicate
   case ids (same id up to letter case, or the same file with another ending);
3. every case's content: files readable and not empty, channel counts as declared, image and label
   of one shape, NIfTI spacing and affine equal between channels and label (relative tolerance
   ``1e-3``, because headers store them as float32), label values within ``labels``, no NaN/inf, no
   constant image;
4. the bookkeeping: ``numTraining`` equals the number of cases found, every case listed under
   ``dataset.json["medalloy"]["cases"]`` exists.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError
from tqdm import tqdm

from medalloy.data.dataset import EXTENSION_KEY, DatasetSpec
from medalloy.data.io import READABLE_ENDINGS, ImageMeta, file_ending, read_any, read_label
from medalloy.errors import MedalloyError

REQUIRED_FIELDS = ("channel_names", "labels", "file_ending")
# Relative tolerance for spacing/affine comparisons: NIfTI headers hold float32, so two files written
# from the same float64 geometry can differ in the 7th digit; real mismatches are far larger.
GEOMETRY_RTOL = 1e-3
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class Problem:
    """One thing wrong with a dataset: the file at fault, what is wrong, and how to fix it."""

    path: Path
    message: str
    fix: str

    def __str__(self) -> str:
        """``"<path>: <message>; <fix>"`` on one line."""
        return f"{self.path}: {self.message}; {self.fix}".replace("\n", " ")


@dataclass
class _Folder:
    """What a scan of ``imagesTr/`` or ``labelsTr/`` found, keyed by case id (and channel)."""

    files: dict[str, dict[int, Path]] = field(default_factory=dict)  # images: case -> channel -> file
    other_endings: dict[tuple[str, int], list[Path]] = field(default_factory=dict)


# -- dataset.json ----------------------------------------------------------------------------


def _check_json(root: Path) -> tuple[DatasetSpec | None, dict, list[Problem], bool]:
    """Parse and validate ``dataset.json``.

    Returns the spec (None when the folders cannot be checked), the raw dict, the problems, and
    whether the label map is usable to check label files (not when a label is a region or no int).
    """
    path = root / "dataset.json"
    if not path.is_file():
        fix = "point to an nnU-Net raw dataset folder (DatasetNNN_Name) that holds a dataset.json"
        return None, {}, [Problem(path, "dataset.json not found", fix)], False
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f"line {exc.lineno}: {exc.msg}" if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"
        return None, {}, [Problem(path, f"invalid JSON ({where})", "fix the syntax")], False
    if not isinstance(raw, dict):
        return None, {}, [Problem(path, "dataset.json is not a JSON object", "follow nnU-Net v2's dataset.json format")], False
    problems = [
        Problem(path, f"required field '{name}' is missing", "add it as in nnU-Net v2's dataset.json format") for name in REQUIRED_FIELDS if name not in raw
    ]
    if problems:
        return None, raw, problems, False
    labels = raw["labels"]
    usable = True
    if isinstance(labels, dict):
        problems += _check_label_values(path, labels)
        # Keep checking the folders with the integer labels only; label files are then not checked.
        int_labels = {k: v for k, v in labels.items() if type(v) is int}
        usable = len(int_labels) == len(labels)
        raw = {**raw, "labels": int_labels}
    try:
        spec = DatasetSpec.model_validate(raw)
    except ValidationError as exc:
        for err in exc.errors():
            where = ".".join(str(x) for x in err["loc"])
            problems.append(Problem(path, f"field '{where}': {err['msg']}", "follow nnU-Net v2's dataset.json format"))
        return None, raw, problems, False
    return spec, raw, problems, usable


def _check_label_values(path: Path, labels: dict[str, Any]) -> list[Problem]:
    """Label values must be single integers (no regions), unique, and 0..K without gaps."""
    problems = []
    ints: dict[str, int] = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            problems.append(Problem(path, f"label '{name}' is a region ({value})", "give each label a single integer value"))
        elif isinstance(value, bool) or not isinstance(value, int):
            problems.append(Problem(path, f"label '{name}' has the non-integer value {value!r}", "give each label a single integer value"))
        else:
            ints[name] = value
    if problems:
        return problems
    values = sorted(ints.values())
    if len(set(values)) != len(values):
        dup = sorted({v for v in values if values.count(v) > 1})
        problems.append(Problem(path, f"label values {dup} are given to more than one name", "give each label its own value"))
    elif 0 not in ints.values():
        problems.append(Problem(path, "no label has the value 0 (background)", 'add "background": 0 to labels'))
    elif values != list(range(len(values))):
        problems.append(
            Problem(path, f"label values {values} are not consecutive from 0", "renumber the labels 0, 1, ..., K (in dataset.json and the label files)")
        )
    return problems


def _test_case_ids(root: Path, ending: str) -> set[str]:
    folder = root / "imagesTs"
    if not folder.is_dir():
        return set()
    ids = set()
    for p in folder.iterdir():
        if p.name.endswith(ending):
            m = re.match(r"^(?P<case>.+)_\d{4}$", p.name[: -len(ending)])
            if m:
                ids.add(m["case"])
    return ids


def _check_bookkeeping(root: Path, raw: dict, spec: DatasetSpec, case_ids: set[str]) -> list[Problem]:
    """``numTraining`` and the cases listed under ``"medalloy"`` must match the cases on disk."""
    path = root / "dataset.json"
    problems = []
    if "numTraining" in raw and spec.numTraining != len(case_ids):
        problems.append(
            Problem(path, f"numTraining is {spec.numTraining} but {len(case_ids)} cases were found in imagesTr", f"set numTraining to {len(case_ids)}")
        )
    listed = spec.extension.get("cases", {}) if isinstance(spec.extension, dict) else {}
    if not isinstance(listed, dict):
        return problems + [Problem(path, f"'{EXTENSION_KEY}.cases' is not an object", 'make it {"CASE": {"source": ..., "patient": ...}}')]
    # Held-out cases in imagesTs/ may carry a source too (per-source test summaries need it).
    test_ids = _test_case_ids(root, spec.file_ending)
    missing = sorted(set(listed) - case_ids - test_ids)
    if missing:
        problems.append(
            Problem(
                path,
                f"{len(missing)} case(s) listed under '{EXTENSION_KEY}.cases' do not exist: {_some(missing)}",
                "remove them from dataset.json or add their files",
            )
        )
    return problems


# -- folder layout ---------------------------------------------------------------------------


def _some(items: Iterable[Any], limit: int = 5) -> str:
    """A short, one-line list: the first few items and how many more."""
    items = list(items)
    text = ", ".join(str(i) for i in items[:limit])
    return text + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def _split_ending(name: str) -> tuple[str, str] | None:
    """``("stem", ".ending")`` for files medalloy can read, None for others (ignored as non-images)."""
    ending = file_ending(name)
    if ending not in READABLE_ENDINGS:
        return None
    return name[: -len(ending)], ending


def _scan_images(folder: Path, ending: str) -> tuple[_Folder, list[Problem]]:
    """Group ``imagesTr`` files by case and channel; flag misnamed files and other endings."""
    found, problems = _Folder(), []
    for p in sorted(folder.iterdir()):
        split = _split_ending(p.name)
        if p.name.startswith(".") or p.is_dir() or split is None:
            continue
        stem, end = split
        m = _CHANNEL_FILE.match(stem)
        if not m:
            problems.append(Problem(p, "image file is not named CASE_XXXX (channel number missing)", f"rename it to {stem}_0000{ending}"))
            continue
        key = (m["case"], int(m["channel"]))
        if end == ending:
            found.files.setdefault(key[0], {})[key[1]] = p
        else:
            found.other_endings.setdefault(key, []).append(p)
    for (case, channel), paths in sorted(found.other_endings.items()):
        twin = found.files.get(case, {}).get(channel)
        for p in paths:
            problems.append(_other_ending_problem(p, twin, ending))
    return found, problems


def _scan_labels(folder: Path, ending: str) -> tuple[dict[str, Path], list[Problem]]:
    """Label files by case id; flag files with another ending than ``file_ending``."""
    labels: dict[str, Path] = {}
    others: list[tuple[str, Path]] = []
    for p in sorted(folder.iterdir()):
        split = _split_ending(p.name)
        if p.name.startswith(".") or p.is_dir() or split is None:
            continue
        stem, end = split
        if end == ending:
            labels[stem] = p
        else:
            others.append((stem, p))
    problems = [_other_ending_problem(p, labels.get(stem), ending) for stem, p in others]
    return labels, problems


def _other_ending_problem(path: Path, twin: Path | None, ending: str) -> Problem:
    """A file with another ending: a duplicate when its ``file_ending`` twin exists, else ignored by nnU-Net."""
    if twin is not None:
        return Problem(path, f"duplicate of {twin.name} with another file ending", "delete one of the two files")
    return Problem(path, f"file ending differs from dataset.json's file_ending '{ending}' (nnU-Net ignores it)", f"convert it to {ending} or fix file_ending")


def _check_layout(root: Path, spec: DatasetSpec, images: _Folder, labels: dict[str, Path] | None) -> list[Problem]:
    """Per case: all channel files, no extra channel, a label; per label: an image; unique ids.

    ``labels`` is None when there is no ``labelsTr/`` at all: one problem then, not one per case.
    """
    ending, n = spec.file_ending, spec.num_channel_files
    problems = []
    if labels is None:
        problems.append(Problem(root / "labelsTr", "no labelsTr/ folder", "put the training labels in labelsTr/ as CASE" + ending))
    for case, channels in sorted(images.files.items()):
        for c in range(n):
            if c not in channels:
                problems.append(
                    Problem(root / "imagesTr" / f"{case}_{c:04d}{ending}", f"case '{case}' is missing channel file {c}", "add the file or remove the case")
                )
        for c in sorted(set(channels) - set(range(n))):
            what = f"{n} channel file(s)" + (" (RGB is one _0000 file)" if spec.is_rgb else "")
            problems.append(
                Problem(channels[c], f"unexpected channel {c}: dataset.json declares {what}", "remove the file or add the channel to channel_names")
            )
        if labels is not None and case not in labels:
            problems.append(Problem(root / "labelsTr" / f"{case}{ending}", f"case '{case}' has no label file", "add the label or move the case to imagesTs/"))
    labels = labels or {}
    for case, path in sorted(labels.items()):
        if case not in images.files:
            problems.append(Problem(path, "label file has no image", f"add imagesTr/{case}_0000{ending} or remove the label"))
    problems += _duplicate_ids(root / "imagesTr", set(images.files) | set(labels))
    return problems


def _duplicate_ids(folder: Path, ids: set[str]) -> list[Problem]:
    """Case ids equal up to letter case collide on case-insensitive file systems (macOS, Windows)."""
    by_lower: dict[str, list[str]] = {}
    for cid in ids:
        by_lower.setdefault(cid.lower(), []).append(cid)
    return [
        Problem(folder, f"case ids {sorted(group)} differ only by letter case", "rename one of them") for _, group in sorted(by_lower.items()) if len(group) > 1
    ]


# -- case content ----------------------------------------------------------------------------


def _read(path: Path, problems: list[Problem], label: bool = False) -> tuple[np.ndarray, ImageMeta] | None:
    """Read a file, turning every read failure (including 0-byte files) into a Problem."""
    try:
        if path.stat().st_size == 0:
            problems.append(Problem(path, "file is empty (0 bytes)", "re-export or copy the file again"))
            return None
        if label:
            return read_label(path)
        return read_any(path)
    except MedalloyError as exc:
        problems.append(Problem(path, str(exc).removeprefix(f"{path}: ").split("; ")[0], exc.fix or "replace the file"))
    except OSError as exc:
        problems.append(Problem(path, f"cannot read file ({exc.strerror or exc})", "check the file's permissions"))
    return None


def _same_geometry(a: ImageMeta, b: ImageMeta) -> str | None:
    """Why two NIfTI grids differ (spacing, then affine), or None when they agree within tolerance."""
    if a.kind != "nifti" or b.kind != "nifti":
        return None
    sa, sb = np.asarray(a.spacing, float), np.asarray(b.spacing, float)
    if sa.shape != sb.shape or not np.allclose(sa, sb, rtol=GEOMETRY_RTOL, atol=0.0):
        return f"spacing {tuple(round(float(s), 6) for s in sb)} differs from {tuple(round(float(s), 6) for s in sa)}"
    if a.affine is not None and b.affine is not None:
        # Scale the absolute tolerance by the voxel size: zero rotation terms and translations are
        # stored as float32 too, and a real mismatch is a sizeable fraction of a voxel.
        atol = GEOMETRY_RTOL * float(np.max(np.abs(sa))) if sa.size else GEOMETRY_RTOL
        if not np.allclose(np.asarray(a.affine), np.asarray(b.affine), rtol=GEOMETRY_RTOL, atol=atol):
            return "affine (orientation/origin) differs"
    return None


def _check_image_file(path: Path, arr: np.ndarray, meta: ImageMeta, spec: DatasetSpec) -> list[Problem]:
    """One channel file: channel count as declared, finite values, not constant."""
    problems = []
    expected = 3 if spec.is_rgb else 1
    if arr.shape[0] != expected:
        want = "RGB (3 channels in one file)" if spec.is_rgb else "1 channel per file"
        fix = "save it as RGB or change channel_names" if spec.is_rgb else "save it as grey or name the channels R, G, B in channel_names"
        problems.append(Problem(path, f"file has {arr.shape[0]} channel(s) but dataset.json declares {want}", fix))
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        problems.append(Problem(path, "image holds NaN or inf values", "replace them (e.g. with the image minimum) and save again"))
    elif arr.size and arr.min() == arr.max():
        problems.append(Problem(path, f"image is constant (every value is {arr.flat[0]})", "replace it with the real image or remove the case"))
    return problems


def _check_case(case: str, channel_files: dict[int, Path], label_path: Path | None, spec: DatasetSpec, check_values: bool = True) -> list[Problem]:
    """Read one case's files and check their content and their agreement with one another."""
    problems: list[Problem] = []
    first: tuple[Path, ImageMeta] | None = None
    for c in range(spec.num_channel_files):
        path = channel_files.get(c)
        if path is None:  # already reported by the layout check
            continue
        got = _read(path, problems)
        if got is None:
            continue
        arr, meta = got
        problems += _check_image_file(path, arr, meta, spec)
        if first is None:
            first = (path, meta)
            continue
        if tuple(meta.shape) != tuple(first[1].shape):
            problems.append(
                Problem(path, f"channel shape {meta.shape} differs from {first[0].name}'s {first[1].shape}", "resample all channels of a case to one grid")
            )
        elif (why := _same_geometry(first[1], meta)) is not None:
            problems.append(Problem(path, f"{why} in {first[0].name}", "resample all channels of a case to one grid"))
    if label_path is None:
        return problems
    got = _read(label_path, problems, label=True)
    if got is None:
        return problems
    lab, lmeta = got
    if first is not None:
        img_path, meta = first
        if tuple(lmeta.shape) != tuple(meta.shape):
            problems.append(Problem(label_path, f"label shape {lmeta.shape} differs from image shape {meta.shape}", "resample the label onto the image grid"))
        elif (why := _same_geometry(meta, lmeta)) is not None:
            problems.append(
                Problem(label_path, f"label {why} in the image {img_path.name}", "resample the label onto the image grid (or copy the image header)")
            )
    unknown = sorted(set(np.unique(lab).tolist()) - set(spec.labels.values())) if check_values else []
    if unknown:
        problems.append(
            Problem(
                label_path, f"label values {unknown} are not in dataset.json labels {sorted(spec.labels.values())}", "add them to labels or fix the label file"
            )
        )
    return problems


# -- entry points ----------------------------------------------------------------------------


def check_dataset(root: str | Path, progress: bool = True) -> list[Problem]:
    """Every problem of the nnU-Net raw dataset at ``root`` (an empty list when it is fine)."""
    root = Path(root)
    if not root.is_dir():
        return [Problem(root, "dataset folder not found", "give the path of a DatasetNNN_Name folder")]
    spec, raw, problems, labels_usable = _check_json(root)
    if not (root / "imagesTr").is_dir():
        return problems + [
            Problem(root / "imagesTr", "no imagesTr/ folder", "put the training images in imagesTr/ as CASE_0000" + (spec.file_ending if spec else ""))
        ]
    if spec is None:
        return problems
    images, found = _scan_images(root / "imagesTr", spec.file_ending)
    problems += found
    labels: dict[str, Path] | None = None
    if (root / "labelsTr").is_dir():
        labels, found = _scan_labels(root / "labelsTr", spec.file_ending)
        problems += found
    problems += _check_layout(root, spec, images, labels)
    problems += _check_bookkeeping(root, raw, spec, set(images.files))
    for case in tqdm(sorted(images.files), desc=f"checking {root.name}", unit="case", disable=not progress):
        problems += _check_case(case, images.files[case], (labels or {}).get(case), spec, labels_usable)
    return problems


def _count_cases(root: Path) -> int:
    """Number of case ids in ``imagesTr`` (for the report's summary line)."""
    try:
        ending = json.loads((root / "dataset.json").read_text(encoding="utf-8")).get("file_ending")
        names = [p.name for p in (root / "imagesTr").iterdir()]
    except (OSError, ValueError, AttributeError):
        return 0
    if not isinstance(ending, str):
        return 0
    stems = (n[: -len(ending)] for n in names if n.endswith(ending) and not n.startswith("."))
    return len({m["case"] for s in stems if (m := _CHANNEL_FILE.match(s))})


def format_report(problems: list[Problem], root: str | Path, num_cases: int | None = None) -> str:
    """The CLI's report: one line per problem, then ``"<name>: N cases, M problems"``."""
    root = Path(root)
    n = _count_cases(root) if num_cases is None else num_cases
    noun = "problem" if len(problems) == 1 else "problems"
    lines = [str(p) for p in problems]
    lines.append(f"{root.name}: {n} cases, {len(problems)} {noun}")
    return "\n".join(lines)
