"""benchmarks/experts.py: the cropped variants train on their base dataset's split and get cross rows; the markdown
points to the notes people write (results/experts/NOTES.md); ``--only`` merges into the existing results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import experts as bench


def test_a_variant_is_its_base_dataset_under_other_planner_options() -> None:
    assert bench.dataset_of("Shenzhen-crop128") == "Shenzhen" and bench.dataset_of("ACDC") == "ACDC"
    assert bench.plan_options("Shenzhen-crop128") == {"max_2d_patch": 128}
    assert bench.plan_options("ACDC") == {"max_2d_patch": 128} and bench.plan_options("JSRT") == {}
    # each variant is scored on the other source, as its whole-image expert is
    for name, (base, _) in bench.VARIANTS.items():
        whole = {test for train, test in bench.CROSS if train == base}
        assert {test for train, test in bench.CROSS if train == name} == whole != set()


def test_variant_rows_and_their_cross_rows_are_in_the_table() -> None:
    def row(source: str, dice: float, options: dict | None = None) -> dict:
        r = {"lung": {"dice": dice, "hd95": 10.0}, "source": source, "mean_dice": dice, "train_minutes": 10.0, "steps": 900}
        return {**r, "plan_options": options} if options is not None else r

    rows = {
        "Shenzhen": row("in", 0.95, {}),
        "Shenzhen-crop128": row("in", 0.94, {"max_2d_patch": 128}),
        "Shenzhen->JSRT": row("cross:Shenzhen->JSRT", 0.50),
        "Shenzhen-crop128->JSRT": row("cross:Shenzhen-crop128->JSRT", 0.40),
    }
    md = bench.markdown(rows, 10.0)
    assert "Shenzhen-crop128: max_2d_patch=128." in md
    assert "| Shenzhen-crop128 | in | lung | 0.940 |" in md
    assert "| Shenzhen-crop128->JSRT | cross:Shenzhen-crop128->JSRT | lung | 0.400 |" in md


def test_markdown_points_to_the_notes_and_holds_none_of_their_text() -> None:
    def row(dice: float, options: dict) -> dict:
        return {"polyp": {"dice": dice, "hd95": 60.0}, "source": "in", "mean_dice": dice, "plan_options": options}

    peer = {
        "polyp": {"dice": 0.4, "hd95": 90.0},
        "mean_dice": 0.4,
        "epochs": 11,
        "iterations_per_epoch": 1,
        "batch_size": 40,
        "patch_size": [256, 256],
        "images_per_second": 0.65,
    }
    md = bench.markdown({"Polyp-Kvasir": {**row(0.617, {"max_2d_side": 128}), "nnunet": peer}, "Polyp-CVC": row(0.567, {})}, 10.0)
    lines = md.splitlines()
    assert lines[-1] == "Notes (written by people, not generated): [NOTES.md](NOTES.md)."
    assert "- missed: Polyp-Kvasir polyp: 0.617 < 0.75" in lines
    assert "Polyp-Kvasir: max_2d_side=128." in md
    notes = (Path(bench.__file__).parent / "results" / "experts" / "NOTES.md").read_text(encoding="utf-8")
    for text in ("polyps vary in size", "How to read the nnU-Net rows", "256x256 frames at full size", "a peer run costs 20-35 minutes"):
        assert text in notes and text not in md


def test_only_merges_its_rows_into_the_existing_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results = tmp_path / "results"
    results.mkdir()
    jsrt = {"lung": {"dice": 0.97, "hd95": 4.0}, "source": "in", "mean_dice": 0.97}
    (results / "results.json").write_text(json.dumps({"JSRT": jsrt}), encoding="utf-8")
    shenzhen = {"lung": {"dice": 0.95, "hd95": 15.0}, "source": "in", "mean_dice": 0.95}
    monkeypatch.setattr(bench, "run_expert", lambda name, data, work, budget, seed: dict(shenzhen))
    assert bench.main(["--data", str(tmp_path), "--work", str(tmp_path / "work"), "--results", str(results), "--only", "Shenzhen"]) == 0
    rows = json.loads((results / "results.json").read_text(encoding="utf-8"))
    assert list(rows) == ["JSRT", "Shenzhen"] and rows["JSRT"] == jsrt and rows["Shenzhen"] == shenzhen
    assert "| Shenzhen | in | lung | 0.950 |" in (results / "results.md").read_text(encoding="utf-8")
    assert bench.RESULTS == Path(bench.__file__).parent / "results" / "experts"
