"""benchmarks/amalgamate.py: the summary and markdown from raw per-arm entries, the universal column
read from the universal study's folder, and the committed results re-rendering as they are."""

from __future__ import annotations

import json

from benchmarks import amalgamate as bench

NOTES = bench.HERE / "results" / "amalgamate" / "NOTES.md"


def _raw() -> dict:
    def expert(dice: float) -> dict:
        return {"scores": {"lung": {"dice": dice}}, "params": 10, "minutes": 2.0, "steps": 100}

    cross = {f"{a}->{b}/polyp": {"dice": 0.4} for a, b in bench.CROSS}
    raw = {"setting": {"budget_per_expert_minutes": 2.0, "seed": 0, "feature_size": 12, "batch_size": None}}
    raw["experts"] = {n: expert(0.9) for n in bench.MEMBERS} | {"cross": cross}
    raw["amalgamated"] = {
        "scores": {n: {"lung": {"dice": 0.95}} for n in bench.MEMBERS}, "params": 60, "trainable_params": 10, "minutes": 10.0, "steps": 50,
        "cross": {k: {"dice": 0.5} for k in cross},
    }  # fmt: skip
    return raw


def test_universal_column_comes_from_the_universal_study_folder(tmp_path, monkeypatch) -> None:
    assert bench.UNIVERSAL.parts[-3:] == ("results", "universal", "results.json") and bench.RESULTS.name == "amalgamate"
    monkeypatch.setattr(bench, "UNIVERSAL", tmp_path / "missing.json")
    assert bench.summary(_raw())["tasks"]["JSRT/lung"]["universal"] is None
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"tasks": {"JSRT/lung": {"universal": 0.8, "experts": 0.9}, "ACDC/RV": {"experts": 0.4}}}))
    monkeypatch.setattr(bench, "UNIVERSAL", path)
    assert bench.universal_rows() == {"JSRT/lung": 0.8}
    res = bench.summary(_raw())
    assert res["tasks"]["JSRT/lung"] == {"experts": 0.9, "amalgamated": 0.95, "universal": 0.8}
    assert res["hardest"]["Polyp-Kvasir->Polyp-CVC/polyp"] == {"experts": 0.4, "amalgamated": 0.5}


def test_markdown_points_to_the_notes_and_holds_none_of_their_text(monkeypatch) -> None:
    monkeypatch.setattr(bench, "UNIVERSAL", bench.HERE / "no-such-file.json")
    raw = _raw()
    md = bench.markdown(bench.summary(raw), raw)
    assert "| JSRT/lung | 0.900 | 0.950 |" in md and "- met: amalgamated mean Dice 0.950 vs experts 0.900 (+0.050)" in md
    assert md.rstrip().endswith("Notes (written by people, not generated): [NOTES.md](NOTES.md).")
    notes = [line[2:] for line in NOTES.read_text(encoding="utf-8").splitlines() if line.startswith("- ")]
    assert notes and not any(n[:60] in md for n in notes)


def test_the_committed_markdown_is_what_the_script_renders_from_the_committed_json() -> None:
    res = json.loads((bench.RESULTS / "results.json").read_text(encoding="utf-8"))
    raw = json.loads((bench.RESULTS / "raw.json").read_text(encoding="utf-8"))
    assert bench.markdown(res, raw) == (bench.RESULTS / "results.md").read_text(encoding="utf-8")
