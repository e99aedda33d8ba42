"""Tests of the image-report CSV reader (medalloy.data.reports)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from medalloy.data.io import write_image
from medalloy.data.reports import ReportColumns, ReportPair, read_report_pairs, read_text_pairs, split_by_patient
from medalloy.errors import MedalloyError

HEADER = ["image", "patient", "finding", "findings", "impression"]


def _png(path: Path) -> None:
    write_image(path, np.full((1, 8, 8), 100, dtype=np.uint8))


def _csv(path: Path, rows: list[list[str]], header: list[str] = HEADER) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def table(tmp_path: Path) -> Path:
    """Four studies of three patients: a.png next to the CSV, b.png and c.png under images/, one multi-line report."""
    _png(tmp_path / "a.png")
    _png(tmp_path / "images" / "b.png")
    _png(tmp_path / "images" / "sub" / "c.png")
    rows = [
        ["a.png", "p1", "Cardiomegaly", "  The heart   is\tenlarged.  ", " Cardiomegaly. "],
        ["b.png", "p2", "No Finding", "Lungs are clear.\nNo effusion.", "Normal."],  # a quoted line break: this row spans lines 3-4
        ["sub/c.png", "p1", "", "Right  lower lobe opacity.", "Pneumonia."],
        ["images/b.png", "p3", "No Finding", "Heart size normal.", "No acute findings."],
    ]
    return _csv(tmp_path / "reports.csv", rows)


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(MedalloyError) as exc:
        fn(*args, **kwargs)
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_good_table_reads_normalised_text_line_numbers_and_images(table: Path) -> None:
    result = read_report_pairs(table, ReportColumns(label="finding"))
    folder = table.parent
    assert [p.row for p in result.pairs] == [2, 3, 5, 6]  # the header is line 1; row 2 spans lines 3-4
    assert [p.image for p in result.pairs] == [folder / "a.png", folder / "images" / "b.png", folder / "images" / "sub" / "c.png", folder / "images" / "b.png"]
    first = result.pairs[0]
    assert (first.findings, first.impression, first.patient, first.label) == ("The heart is enlarged.", "Cardiomegaly.", "p1", "Cardiomegaly")
    assert result.pairs[1].findings == "Lungs are clear. No effusion."  # line break collapsed, case kept
    assert result.pairs[2].findings == "Right lower lobe opacity." and result.pairs[2].label is None  # an empty label is None
    assert result.skipped == {} and len(result) == 4
    assert result.summary() == "reports.csv: 4 pairs"
    # default columns: no label; an explicit image_dir resolves paths under it only
    assert all(p.label is None for p in read_report_pairs(table).pairs)
    moved = _csv(folder / "elsewhere" / "t.csv", [["a.png", "p9", "", "x.", "y."]])
    got = read_report_pairs(moved, ReportColumns(image_dir=str(folder))).pairs
    assert got == [ReportPair(row=2, image=folder / "a.png", findings="x.", impression="y.", patient="p9", label=None)]


def test_patient_column_optional_only_by_default(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    path = _csv(tmp_path / "t.csv", [["a.png", "f.", "i."], ["a.png", "g.", "j."]], header=["image", "findings", "impression"])
    assert [p.patient for p in read_report_pairs(path).pairs] == ["row2", "row3"]
    assert [p.patient for p in read_report_pairs(path, ReportColumns(patient=None)).pairs] == ["row2", "row3"]
    message = _error(read_report_pairs, path, ReportColumns(patient="patient"))  # named explicitly: must exist
    assert str(path) in message and "'patient'" in message and "--patient-column" in message


def test_text_only_table(tmp_path: Path) -> None:
    path = _csv(
        tmp_path / "iu.csv",
        [["1", "normal", "Clear  lungs.", "Normal."], ["2", "x", "Big heart.", "Cardiomegaly."]],
        header=["uid", "MeSH", "findings", "impression"],
    )
    result = read_text_pairs(path)
    assert [(p.row, p.image, p.patient, p.findings) for p in result.pairs] == [(2, None, "row2", "Clear lungs."), (3, None, "row3", "Big heart.")]
    renamed = _csv(tmp_path / "r.csv", [["a", "b"]], header=["text", "summary"])
    assert read_text_pairs(renamed, findings="text", impression="summary").pairs[0].impression == "b"


def test_file_level_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    assert str(missing) in _error(read_report_pairs, missing) and "not found" in _error(read_report_pairs, missing)
    empty = tmp_path / "empty.csv"
    empty.write_text("\n\n", encoding="utf-8")
    assert "no header" in _error(read_report_pairs, empty)
    binary = tmp_path / "image.csv"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x00")
    message = _error(read_report_pairs, binary)
    assert str(binary) in message and "not a CSV" in message
    assert "folder" in _error(read_report_pairs, tmp_path)


def test_missing_columns_are_listed_with_the_columns_present_and_the_flag(tmp_path: Path) -> None:
    path = _csv(tmp_path / "t.csv", [["a.png", "p", "f", "i"]], header=["image", "patient", "notes", "finding"])
    message = _error(read_report_pairs, path)
    assert str(path) in message
    assert "'findings'" in message and "'impression'" in message
    assert "columns present: image, patient, notes, finding" in message
    assert "--findings-column" in message and "--impression-column" in message
    only = _error(read_report_pairs, path, ReportColumns(findings="notes", impression="finding", label="diagnosis"))
    assert "missing column 'diagnosis' (label)" in only and "--label-column" in only


def test_row_errors_name_file_line_and_column(table: Path) -> None:
    folder = table.parent
    # a missing image: the row's line and every path tried
    bad = _csv(folder / "bad.csv", [["a.png", "p", "", "f.", "i."], ["gone.png", "p", "", "f.", "i."]])
    message = _error(read_report_pairs, bad)
    assert str(bad) in message and "line 3" in message and "'image'" in message
    assert str(folder / "gone.png") in message and str(folder / "images" / "gone.png") in message
    assert read_report_pairs(bad, check_images=False).pairs[1].image == folder / "gone.png"
    # empty findings / impression (whitespace only counts as empty)
    for column, row in (("findings", ["a.png", "p", "", "  \n ", "i."]), ("impression", ["a.png", "p", "", "f.", ""])):
        path = _csv(folder / f"empty_{column}.csv", [["a.png", "p", "", "f.", "i."], ["a.png", "p", "", "f.", "i."], row])
        message = _error(read_report_pairs, path)
        assert str(path) in message and "line 4" in message and f"empty {column}" in message and f"'{column}'" in message
    path = _csv(folder / "renamed.csv", [["a.png", "p", "", "i."]], header=["image", "patient", "notes", "impression"])
    assert "'notes'" in _error(read_report_pairs, path, ReportColumns(findings="notes"))
    # an empty patient id, and a row with the wrong number of fields
    path = _csv(folder / "nopatient.csv", [["a.png", " ", "", "f.", "i."]])
    message = _error(read_report_pairs, path)
    assert "line 2" in message and "'patient'" in message
    path = _csv(folder / "short.csv", [["a.png", "p", "", "f.", "i."], ["a.png", "p", "f.", "i."]])
    message = _error(read_report_pairs, path)
    assert str(path) in message and "line 3" in message and "4 fields" in message


def test_skip_empty_counts_skipped_rows(table: Path) -> None:
    folder = table.parent
    rows = [
        ["a.png", "p1", "", "f.", "i."],
        ["a.png", "p1", "", "", "i."],
        ["a.png", "p2", "", " ", ""],
        ["a.png", "p2", "", "f.", " "],
        ["a.png", "p3", "", "g.", "j."],
    ]
    path = _csv(folder / "gaps.csv", rows)
    result = read_report_pairs(path, skip_empty=True)
    assert [p.row for p in result.pairs] == [2, 6]
    assert result.skipped == {"empty findings": 2, "empty impression": 1}
    assert result.summary() == "gaps.csv: 2 pairs (skipped: 2 empty findings, 1 empty impression)"
    assert read_text_pairs(_csv(folder / "t.csv", [["", "x"], ["a", "b"]], header=["findings", "impression"]), skip_empty=True).skipped == {"empty findings": 1}


def _pairs(patients: dict[str, int]) -> list[ReportPair]:
    pairs, row = [], 2
    for k in range(max(patients.values())):  # interleaved, as in a real table
        for patient, n in patients.items():
            if k < n:
                pairs.append(ReportPair(row=row, image=None, findings=f"f{row}", impression="i", patient=patient, label=None))
                row += 1
    return pairs


def test_split_by_patient() -> None:
    pairs = _pairs({f"p{i}": 1 + i % 3 for i in range(20)})
    train, val = split_by_patient(pairs, 0.25, seed=0)
    assert sorted(p.row for p in train + val) == [p.row for p in pairs]  # every pair exactly once
    assert not {p.patient for p in train} & {p.patient for p in val}  # never splits a patient
    assert len({p.patient for p in val}) == 5
    assert [p.row for p in train] == sorted(p.row for p in train) and [p.row for p in val] == sorted(p.row for p in val)
    assert split_by_patient(pairs, 0.25, seed=0) == (train, val)  # deterministic
    assert split_by_patient(list(reversed(pairs)), 0.25, seed=0)[1] == list(reversed(val))  # depends on the patients, not the order
    assert any(split_by_patient(pairs, 0.25, seed=s)[1] != val for s in (1, 2, 3))
    # at least one val patient, at least one train patient
    two = _pairs({"a": 3, "b": 1})
    assert len({p.patient for p in split_by_patient(two, 0.01, seed=0)[1]}) == 1
    assert len({p.patient for p in split_by_patient(two, 0.9, seed=0)[0]}) == 1
    assert split_by_patient(two, 0.0, seed=0) == (two, [])
    assert split_by_patient(_pairs({"a": 2}), 0.5, seed=0)[1] == []
    assert "val_fraction" in _error(split_by_patient, two, 1.0, 0)


def test_patient_none_in_any_case_means_no_patient_column(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    path = _csv(tmp_path / "t.csv", [["a.png", "", "f.", "i."], ["a.png", "", "g.", "j."]], header=["image", "patient", "findings", "impression"])
    assert "empty patient" in _error(read_report_pairs, path)
    for spelled in ("none", "None", " NONE "):
        columns = ReportColumns(patient=spelled)
        assert columns.patient is None
        assert [p.patient for p in read_report_pairs(path, columns).pairs] == ["row2", "row3"]
    assert ReportColumns.model_validate(yaml.safe_load("patient: none")).patient is None  # as a YAML config writes it
    assert ReportColumns(patient="nonetheless").patient == "nonetheless"  # only the word itself


def test_an_unset_default_patient_column_stays_optional_through_a_config_round_trip(tmp_path: Path) -> None:
    """A recipe validates a copy of its config (model_dump and back): the default patient column must
    stay optional, so that naming another column (--findings-column) does not make it required."""
    _png(tmp_path / "a.png")
    path = _csv(tmp_path / "t.csv", [["a.png", "f.", "i."]], header=["image", "notes", "impression"])
    columns = ReportColumns(findings="notes")
    again = ReportColumns.model_validate(yaml.safe_load(yaml.safe_dump(columns.model_dump(mode="json"))))
    assert again == columns and "patient" not in again.model_fields_set
    assert [p.patient for p in read_report_pairs(path, again).pairs] == ["row2"]
    named = ReportColumns.model_validate(ReportColumns(patient="patient").model_dump(mode="json"))
    assert "'patient'" in _error(read_report_pairs, path, named.model_copy(update={"findings": "notes"}))  # named explicitly: still required


# every fix the reader's messages suggest, and the commands whose CSV flags must take it
FIX_COMMANDS = {
    "--label-column": ("probe",),
    "--text-only": ("pretrain",),
    "--text-only-findings-column": ("pretrain",),
    "--text-only-impression-column": ("pretrain",),
    "--val-fraction": ("pretrain",),
}
REQUIRED = {
    "pretrain": ["pretrain", "--pairs", "p.csv", "--out", "run"],
    "probe": ["probe", "run", "--pairs", "p.csv"],
    "retrieve": ["retrieve", "run", "--pairs", "p.csv"],
}


def _suggested_fixes(tmp_path: Path) -> list[str]:
    """The reader's messages that suggest a flag: every missing column at once, a text-only table's,
    an empty report, a missing image, an empty patient and a bad validation fraction."""
    _png(tmp_path / "a.png")
    nothing = _csv(tmp_path / "x.csv", [["1"]], header=["x"])
    return [
        _error(read_report_pairs, nothing, ReportColumns(patient="patient", label="finding")),
        _error(read_text_pairs, nothing),
        _error(read_report_pairs, _csv(tmp_path / "e.csv", [["a.png", "p", "", " ", "i."]])),
        _error(read_report_pairs, _csv(tmp_path / "g.csv", [["gone.png", "p", "", "f.", "i."]])),
        _error(read_report_pairs, _csv(tmp_path / "p.csv", [["a.png", "", "", "f.", "i."]])),
        _error(split_by_patient, _pairs({"a": 1, "b": 1}), 1.5, 0),
    ]


def test_every_fix_the_messages_suggest_is_a_flag_the_commands_accept(tmp_path: Path) -> None:
    from medalloy.cli import _report_columns, build_parser

    parser = build_parser()

    def parses(argv: list[str]):
        try:
            return parser.parse_args(argv)
        except SystemExit:  # argparse: an unknown flag, or a value missing or extra
            return None

    seen = set()
    for message in _suggested_fixes(tmp_path):
        for flag, value in re.findall(r"(--[a-z][a-z-]*)(?: ([a-z][\w.]*))?", message):
            seen.add(flag)
            for command in FIX_COMMANDS.get(flag, ("pretrain", "probe", "retrieve")):
                base = REQUIRED[command]
                args = parses([*base, flag, value]) if value else (parses([*base, flag]) or parses([*base, flag, "X"]) or parses([*base, flag, "0.5"]))
                assert args is not None, f"medalloy {command} does not take {flag} {value} (suggested by: {message})"
                if value:  # a value to type: it does what the message says
                    assert (flag, value) == ("--patient-column", "none") and ReportColumns.model_validate(_report_columns(args)).patient is None
                    seen.add(f"{flag} {value}")
    assert seen == {
        "--image-column", "--findings-column", "--impression-column", "--patient-column", "--label-column", "--text-only",
        "--text-only-findings-column", "--text-only-impression-column", "--skip-empty", "--image-dir", "--val-fraction", "--patient-column none",
    }  # fmt: skip


def test_the_suggested_fixes_work_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each fix turns its error into the next check, too few pairs to pretrain on: the table was read."""
    from medalloy.cli import main

    _png(tmp_path / "a.png")
    no_patient = _csv(tmp_path / "notes.csv", [["a.png", "f.", "i."]], header=["image", "notes", "impression"])
    empty_patient = _csv(tmp_path / "empty.csv", [["a.png", "", "", "f.", "i."]])
    elsewhere = _csv(tmp_path / "sub" / "t.csv", [["a.png", "p", "", "f.", "i."]])
    renamed = _csv(tmp_path / "iu.csv", [["f.", "i."]], header=["text", "summary"])
    cases = [
        ([no_patient], ["--findings-column", "notes"], "missing column 'findings'"),  # and then no demand for the default patient column
        ([empty_patient], ["--patient-column", "none"], "empty patient"),
        ([empty_patient], ["--patient-column", "None"], "empty patient"),
        ([elsewhere], ["--image-dir", str(tmp_path)], "image not found"),
        ([empty_patient, "--text-only", str(renamed), "--patient-column", "none"], ["--text-only-findings-column", "text", "--text-only-impression-column", "summary"], "--text-only-findings-column"),
    ]  # fmt: skip
    for pairs, fix, before in cases:
        argv = ["-q", "train", "pretrain", "--pairs", *map(str, pairs), "--out", str(tmp_path / "run")]
        assert main(argv) == 1
        assert before in capsys.readouterr().err
        assert main([*argv, *fix]) == 1
        err = capsys.readouterr().err
        assert "too few to pretrain on" in err and err.count("\n") == 1, (fix, err)
    assert not (tmp_path / "run").exists()


@pytest.mark.realdata
def test_real_report_tables_read(shared_data: Path) -> None:
    folder = shared_data / "CXR-Text"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    covid = read_report_pairs(folder / "covid_cxr_notes.csv", ReportColumns(findings="notes", impression="finding", label="finding"))
    assert len(covid.pairs) == 459 and all(p.image is not None and p.image.is_file() for p in covid.pairs)
    iu = read_text_pairs(folder / "iu_xray_reports.csv")
    assert len(iu.pairs) == 3331
