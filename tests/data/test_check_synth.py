"""The built-in synthetic datasets pass `data check`, including the held-out cases they list."""

from __future__ import annotations

import json

from medalloy.data.check import check_dataset
from medalloy.data.synth import generate_dataset


def test_synthetic_dataset_with_test_cases_passes_check(tmp_path):
    ds = generate_dataset("Dataset904_SynthEndo", tmp_path, seed=3, cases_per_source=2, test_cases_per_source=1, progress=False)
    listed = json.loads((ds / "dataset.json").read_text(encoding="utf-8"))["medalloy"]["cases"]
    assert any((ds / "imagesTs" / f"{c}_0000.png").exists() for c in listed)  # test cases are listed
    assert check_dataset(ds, progress=False) == []
    # a listed case that exists nowhere is still reported
    raw = json.loads((ds / "dataset.json").read_text(encoding="utf-8"))
    raw["medalloy"]["cases"]["ghost_case"] = {"source": "x"}
    (ds / "dataset.json").write_text(json.dumps(raw), encoding="utf-8")
    problems = check_dataset(ds, progress=False)
    assert len(problems) == 1 and "ghost_case" in str(problems[0])
