"""nnU-Net v2 raw datasets: ``dataset.json`` + ``imagesTr/CASE_XXXX.ext`` + ``labelsTr/CASE.ext``.

medalloy keeps its per-case extras (``source``: centre/scanner/site, ``patient``: grouping for splits)
in ``dataset.json`` under the key ``"medalloy"``, which nnU-Net ignores::

    "medalloy": {"cases": {"CASE": {"source": "siteA", "patient": "P001"}}, "modality": "MR"}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medalloy.data.io import ImageMeta, read_image, read_label
from medalloy.errors import MedalloyError
from medalloy.jsonio import read_json, write_json_atomic  # noqa: F401  (write_json_atomic kept importable from here)

EXTENSION_KEY = "medalloy"
DEFAULT_SOURCE = "default"
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


class DatasetSpec(BaseModel):
    """The fields of nnU-Net's ``dataset.json`` that medalloy uses (others are kept on write)."""

    model_config = ConfigDict(extra="allow")

    channel_names: dict[str, str]
    labels: dict[str, int]
    numTraining: int = 0
    file_ending: str
    name: str | None = None
    extension: dict[str, Any] = Field(default_factory=dict, alias=EXTENSION_KEY)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def is_rgb(self) -> bool:
        """nnU-Net's convention: RGB stored in one ``_0000`` file when the channels are named R, G, B."""
        names = [v.upper() for _, v in sorted(self.channel_names.items(), key=lambda kv: int(kv[0]))]
        return names == ["R", "G", "B"]

    @property
    def num_channel_files(self) -> int:
        return 1 if self.is_rgb else self.num_channels

    @property
    def label_names(self) -> dict[int, str]:
        return {v: k for k, v in self.labels.items()}

    @property
    def foreground_labels(self) -> dict[str, int]:
        return {k: v for k, v in self.labels.items() if v != 0}

    @property
    def modality(self) -> str:
        return str(self.extension.get("modality") or next(iter(self.channel_names.values()), "unknown"))


@dataclass
class Case:
    """One training case: its channel files, its label file (if any), and where it came from."""

    case_id: str
    images: list[Path]
    label: Path | None
    source: str = DEFAULT_SOURCE
    patient: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def group(self) -> str:
        """The unit that must not be split across folds: the patient when known, else the case."""
        return self.patient or self.case_id


class RawDataset:
    """An nnU-Net v2 raw dataset folder, with medalloy's per-case ``source``/``patient`` extras."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise MedalloyError("dataset folder not found", self.root, "give the path of a DatasetNNN_Name folder")
        raw = read_json(self.root / "dataset.json", "dataset.json", "point to an nnU-Net raw dataset folder (DatasetNNN_Name)")
        try:
            self.spec = DatasetSpec.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise MedalloyError(f"dataset.json field '{where}': {err['msg']}", self.root / "dataset.json", "follow nnU-Net v2's dataset.json format") from None
        for name, value in self.spec.labels.items():
            if not isinstance(value, int):
                raise MedalloyError(
                    f"label '{name}' is a region ({value}); medalloy needs one integer per label",
                    self.root / "dataset.json",
                    "give each label a single integer value",
                )
        self._raw = raw
        self.cases = self._discover("imagesTr", "labelsTr")

    # -- discovery -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name or self.root.name

    @property
    def case_extras(self) -> dict[str, dict]:
        return dict(self.spec.extension.get("cases", {}))

    def _discover(self, image_dir: str, label_dir: str | None) -> list[Case]:
        ending = self.spec.file_ending
        folder = self.root / image_dir
        if not folder.is_dir():
            if image_dir == "imagesTr":
                raise MedalloyError(f"no {image_dir}/ folder", self.root, "put the training images in imagesTr/")
            return []
        channels: dict[str, dict[int, Path]] = {}
        for p in sorted(folder.iterdir()):
            if not p.name.endswith(ending) or p.name.startswith("."):
                continue
            m = _CHANNEL_FILE.match(p.name[: -len(ending)])
            if not m:
                continue
            channels.setdefault(m["case"], {})[int(m["channel"])] = p
        extras = self.case_extras
        cases = []
        for cid in sorted(channels):
            files = [channels[cid][k] for k in sorted(channels[cid])]
            label = None
            if label_dir is not None:
                cand = self.root / label_dir / f"{cid}{ending}"
                label = cand if cand.exists() else None
            info = extras.get(cid, {})
            cases.append(
                Case(
                    case_id=cid,
                    images=files,
                    label=label,
                    source=str(info.get("source", DEFAULT_SOURCE)),
                    patient=info.get("patient"),
                    extra={k: v for k, v in info.items() if k not in ("source", "patient")},
                )
            )
        return cases

    def test_cases(self) -> list[Case]:
        """Cases in ``imagesTs/`` (labels from ``labelsTs/`` when present)."""
        return self._discover("imagesTs", "labelsTs")

    def labelled_cases(self) -> list[Case]:
        return [c for c in self.cases if c.label is not None]

    def case(self, case_id: str) -> Case:
        for c in self.cases:
            if c.case_id == case_id:
                return c
        raise MedalloyError(f"no case '{case_id}'", self.root, "list the cases with `medalloy data check`")

    @property
    def sources(self) -> list[str]:
        return sorted({c.source for c in self.cases})

    # -- loading ---------------------------------------------------------------------------
    def load(self, case: Case | str) -> tuple[np.ndarray, np.ndarray | None, ImageMeta]:
        """Image ``(C, *spatial)`` float32, label ``(*spatial)`` int64 or None, and the image geometry."""
        if isinstance(case, str):
            case = self.case(case)
        image, meta = read_image(case.images)
        label = None
        if case.label is not None:
            label, lmeta = read_label(case.label)
            if tuple(label.shape) != tuple(meta.shape):
                raise MedalloyError(
                    f"label shape {tuple(label.shape)} differs from image shape {tuple(meta.shape)}",
                    case.label,
                    "resample the label onto the image grid",
                )
        return image, label, meta

    def __len__(self) -> int:
        return len(self.cases)

    def __repr__(self) -> str:
        return f"RawDataset({self.root.name}: {len(self.cases)} cases, labels={self.spec.labels}, sources={self.sources})"


def make_dataset_json(
    channel_names: dict[str, str],
    labels: dict[str, int],
    num_training: int,
    file_ending: str,
    name: str,
    cases: dict[str, dict] | None = None,
    modality: str | None = None,
    **extra: Any,
) -> dict:
    """A ``dataset.json`` dict in nnU-Net v2 form, with medalloy's per-case extras."""
    ext: dict[str, Any] = {"cases": cases or {}}
    if modality:
        ext["modality"] = modality
    out = {
        "channel_names": {str(k): v for k, v in channel_names.items()},
        "labels": dict(labels),
        "numTraining": int(num_training),
        "file_ending": file_ending,
        "name": name,
        **extra,
        EXTENSION_KEY: ext,
    }
    return out
