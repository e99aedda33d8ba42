"""A folder of images to predict: its cases (nnU-Net's ``CASE_0000.ext`` channel naming, or one file
a case) and the file ending each prediction is written with. No torch: the deployment runtime reads
folders with it too."""

from __future__ import annotations

import re
from pathlib import Path

from medalloy.data.io import READABLE_ENDINGS, ImageMeta, file_ending
from medalloy.errors import MedalloyError

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


def find_input_cases(folder: str | Path) -> dict[str, list[Path]]:
    """Case id -> channel files, sorted by channel index."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MedalloyError("input folder not found", folder, "give a folder of images (nnU-Net naming CASE_0000.ext)")
    cases: dict[str, dict[int, Path]] = {}
    for p in sorted(folder.iterdir()):
        ending = file_ending(p)
        if p.name.startswith(".") or ending not in READABLE_ENDINGS:
            continue
        stem = p.name[: -len(ending)]
        m = _CHANNEL.match(stem)
        case, ch = (m["case"], int(m["ch"])) if m else (stem, 0)
        if ch in cases.setdefault(case, {}):
            raise MedalloyError(f"two files for case '{case}' channel {ch}", p, "keep one file per case and channel")
        cases[case][ch] = p
    if not cases:
        raise MedalloyError("no images found", folder, f"put images ending in one of {', '.join(READABLE_ENDINGS)} there")
    return {c: [chs[k] for k in sorted(chs)] for c, chs in cases.items()}


def output_ending(input_file: Path, ndim: int) -> str:
    ending = file_ending(input_file)
    if ending in (".jpg", ".jpeg"):
        return ".png"  # masks must be lossless
    if ending == ".dcm" or input_file.is_dir():
        return ".nii.gz" if ndim == 3 else ".png"
    return ending


def written_geometry(meta: ImageMeta) -> ImageMeta | None:
    """The geometry a prediction is written with: the input's, except a 2D DICOM's, which becomes a plain PNG."""
    return meta if meta.kind != "dicom" or meta.ndim == 3 else None
