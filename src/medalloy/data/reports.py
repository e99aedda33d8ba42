"""Image-report tables: CSV files that pair a chest X-ray (or nothing) with its report text.

One row is one study: an image path, the report's *findings* (the description) and *impression*
(the summary), the patient and optionally a class label. Every problem is a one-line
:class:`~medalloy.errors.MedalloyError` naming the file, the row's line number and the fix; rows are
never dropped silently (``skip_empty`` skips empty reports and counts them in ``skipped``).

Text is normalised only in its whitespace: stripped, internal runs (newlines included) collapsed to
one space; case and punctuation are kept.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, field_validator, model_serializer

from medalloy.errors import MedalloyError

# which command-line flag names each configurable column (for the fix in error messages): the
# image-report table's (medalloy train pretrain --pairs, probe, retrieve; --label-column: probe) ...
_FLAGS = {
    "image": "--image-column",
    "findings": "--findings-column",
    "impression": "--impression-column",
    "patient": "--patient-column",
    "label": "--label-column",
}
# ... and the text-only table's (medalloy train pretrain --text-only)
TEXT_ONLY_FLAGS = {"findings": "--text-only-findings-column", "impression": "--text-only-impression-column"}


class ReportColumns(BaseModel):
    """Which CSV columns hold what, and where images are.

    ``image``: the image path, relative to ``image_dir`` (default: the CSV's folder, then its
    ``images/`` subfolder); ``None`` for text-only tables. ``patient``: ``None`` makes every row its
    own patient (``row<line>``), and so does the text ``none`` in any case (``--patient-column none``,
    ``patient: none`` in YAML); the default column ``patient`` may also be absent from the CSV, with
    the same effect, while a column named explicitly must exist (a default left unset stays unset
    through ``model_dump`` and back, so a recipe's copy of the config keeps it optional). ``label``:
    an optional class column, kept as text (``None`` where empty).
    """

    model_config = ConfigDict(extra="forbid")

    image: str | None = "image"
    findings: str = "findings"
    impression: str = "impression"
    patient: str | None = "patient"
    label: str | None = None
    image_dir: str | None = None

    @field_validator("patient", mode="before")
    @classmethod
    def _none_means_no_column(cls, value: object) -> object:
        return None if isinstance(value, str) and value.strip().lower() == "none" else value

    @model_serializer(mode="wrap")
    def _default_patient_stays_unset(self, handler):
        data = handler(self)
        if "patient" not in self.model_fields_set:
            data.pop("patient", None)
        return data


@dataclass(frozen=True)
class ReportPair:
    """One study: ``row`` is its line number in the CSV (the header is line 1)."""

    row: int
    image: Path | None
    findings: str
    impression: str
    patient: str
    label: str | None


@dataclass
class ReportTable:
    """The pairs read from one CSV and how many rows were skipped on purpose, by reason."""

    path: Path
    pairs: list[ReportPair]
    skipped: dict[str, int]

    def summary(self) -> str:
        text = f"{self.path.name}: {len(self.pairs)} pairs"
        if self.skipped:
            text += f" (skipped: {', '.join(f'{n} {reason}' for reason, n in self.skipped.items())})"
        return text

    def __len__(self) -> int:
        return len(self.pairs)


def normalise_text(text: str) -> str:
    """Strip and collapse every run of whitespace (newlines, tabs, non-breaking spaces) to one space."""
    return " ".join(text.split())


def _read_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header (names stripped) and every non-blank row with the line it starts on."""
    if not path.exists():
        raise MedalloyError("file not found", path, "check the path of the report CSV")
    if not path.is_file():
        raise MedalloyError("is a folder, not a CSV file", path, "give the path of the report CSV itself")
    rows: list[tuple[int, list[str]]] = []
    header: list[str] | None = None
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            line = 0
            for record in reader:
                start, line = line + 1, reader.line_num
                if not record:  # a blank line: no row
                    continue
                if header is None:
                    header = [name.strip() for name in record]
                else:
                    rows.append((start, record))
    except UnicodeDecodeError as exc:
        raise MedalloyError(f"not UTF-8 text (byte {exc.start}); not a CSV file", path, "save the table as UTF-8 CSV") from None
    except OSError as exc:
        raise MedalloyError(f"cannot read ({exc.strerror or exc.__class__.__name__})", path, "check the file's permissions") from None
    except csv.Error as exc:
        raise MedalloyError(
            f"not a valid CSV (line {reader.line_num}: {exc})", path, "save the table as a comma-separated CSV with quoted text fields"
        ) from None
    if header is None or not any(header):
        raise MedalloyError("no header row (the file is empty)", path, "write a CSV whose first line names the columns")
    return header, rows


def _resolve_image(value: str, csv_path: Path, image_dir: str | None) -> tuple[Path, list[Path]]:
    """The image's path (the first candidate that exists, else the first) and every candidate tried."""
    rel = Path(value)
    if image_dir is not None:
        candidates = [Path(image_dir) / rel]
    else:
        candidates = [csv_path.parent / rel]
        if not rel.is_absolute():
            candidates.append(csv_path.parent / "images" / rel)
    for c in candidates:
        if c.is_file():
            return c, candidates
    return candidates[0], candidates


def read_report_pairs(
    csv_path: str | Path, columns: ReportColumns | None = None, skip_empty: bool = False, check_images: bool = True, flags: dict[str, str] | None = None
) -> ReportTable:
    """Read an image-report CSV into :class:`ReportPair` rows, in file order.

    ``columns`` names the columns (default :class:`ReportColumns`). Empty findings or impression raise
    unless ``skip_empty``, which skips the row and counts it under ``"empty findings"`` /
    ``"empty impression"``. With ``check_images`` every image must exist. ``flags``: the command-line
    flag that names each column, for the fix a missing column's message gives (default: those of
    ``medalloy train pretrain --pairs``).
    """
    flag_of = {**_FLAGS, **(flags or {})}
    columns = ReportColumns() if columns is None else columns
    path = Path(csv_path)
    header, rows = _read_rows(path)

    wanted = {"image": columns.image, "findings": columns.findings, "impression": columns.impression, "patient": columns.patient, "label": columns.label}
    patient_optional = columns.patient is not None and "patient" not in columns.model_fields_set
    if patient_optional and columns.patient not in header:
        wanted["patient"] = None  # the default column is absent: every row is its own patient
    wanted = {k: v for k, v in wanted.items() if v is not None}
    missing = {k: v for k, v in wanted.items() if v not in header}
    if missing:
        names = ", ".join(f"'{v}' ({k})" for k, v in missing.items())
        named_by = " / ".join(flag_of[k] for k in missing)
        raise MedalloyError(
            f"missing column{'s' if len(missing) > 1 else ''} {names}; columns present: {', '.join(header)}",
            path,
            f"name the column{'s' if len(missing) > 1 else ''} with {named_by}"
            + (" (a table without images: image=None; medalloy train pretrain takes it as --text-only CSV)" if "image" in missing else ""),
        )
    doubled = sorted({v for v in wanted.values() if header.count(v) > 1})
    if doubled:
        raise MedalloyError(
            f"column name{'s' if len(doubled) > 1 else ''} {', '.join(repr(v) for v in doubled)} appear more than once in the header",
            path,
            "give every column a distinct name",
        )
    index = {k: header.index(v) for k, v in wanted.items()}

    pairs: list[ReportPair] = []
    skipped: dict[str, int] = {}
    for line, record in rows:
        if len(record) != len(header):
            raise MedalloyError(
                f"line {line}: {len(record)} fields, the header has {len(header)}",
                path,
                "quote text fields that hold commas or line breaks, and give every row one value per column",
            )
        text = {k: normalise_text(record[i]) for k, i in index.items()}
        empty = next((k for k in ("findings", "impression") if not text[k]), None)
        if empty is not None:
            if skip_empty:
                reason = f"empty {empty}"
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            raise MedalloyError(
                f"line {line}: empty {empty} (column '{wanted[empty]}')",
                path,
                "fill in the report text, remove the row, or pass skip_empty=True (--skip-empty) to skip such rows",
            )
        image = None
        if "image" in index:
            if not text["image"]:
                raise MedalloyError(f"line {line}: empty image path (column '{columns.image}')", path, "fill in the image path or remove the row")
            value = record[index["image"]].strip()
            image, tried = _resolve_image(value, path, columns.image_dir)
            if check_images and not image.is_file():
                raise MedalloyError(
                    f"line {line}: image not found (column '{columns.image}', tried {' and '.join(str(t) for t in tried)})",
                    path,
                    "put the images next to the CSV or under its images/ folder, or set image_dir (--image-dir)",
                )
        if "patient" in index:
            patient = text["patient"]
            if not patient:
                raise MedalloyError(
                    f"line {line}: empty patient (column '{columns.patient}')",
                    path,
                    "fill in the patient id, or set patient=None (--patient-column none) to make every row its own patient",
                )
        else:
            patient = f"row{line}"
        label = (text["label"] or None) if "label" in index else None
        pairs.append(ReportPair(row=line, image=image, findings=text["findings"], impression=text["impression"], patient=patient, label=label))
    return ReportTable(path=path, pairs=pairs, skipped=skipped)


def read_text_pairs(csv_path: str | Path, findings: str = "findings", impression: str = "impression", skip_empty: bool = False) -> ReportTable:
    """Read a text-only report CSV (findings -> impression, e.g. for summarisation); every row is its own patient."""
    columns = ReportColumns(image=None, findings=findings, impression=impression, patient=None)
    return read_report_pairs(csv_path, columns, skip_empty=skip_empty, check_images=False, flags=TEXT_ONLY_FLAGS)


def split_by_patient(pairs: list[ReportPair], val_fraction: float, seed: int) -> tuple[list[ReportPair], list[ReportPair]]:
    """(train, val): ``round(val_fraction * patients)`` whole patients to val, chosen by ``seed``.

    A patient's pairs are never split; at least one patient goes to val when ``val_fraction > 0``
    and there are two or more patients, and at least one stays in train. The choice depends on the
    set of patients and the seed only (not on row order); both lists keep the pairs' order.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction < 1.0:
        raise MedalloyError(f"val_fraction must be in [0, 1), got {val_fraction!r}", fix="pass a fraction such as 0.1 (--val-fraction)")
    patients = sorted({p.patient for p in pairs})
    n_val = int(round(val_fraction * len(patients)))
    if val_fraction > 0 and len(patients) >= 2:
        n_val = min(max(n_val, 1), len(patients) - 1)
    else:
        n_val = 0
    order = np.random.default_rng(seed).permutation(len(patients))
    val_patients = {patients[i] for i in order[:n_val]}
    train = [p for p in pairs if p.patient not in val_patients]
    val = [p for p in pairs if p.patient in val_patients]
    return train, val
