"""The example pipelines: each is valid, and with the real data present each resolves (a dry run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from medalloy.pipeline import load_pipeline, run

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def test_there_are_the_demo_and_the_real_data_examples():
    assert {p.stem for p in EXAMPLES} >= {"demo", "chest-xray", "polyp", "five-2d"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_each_example_is_a_valid_pipeline(path, tmp_path):
    cfg = load_pipeline(path, variables={"DATA": str(tmp_path)})
    assert cfg.stages and cfg.datasets


@pytest.mark.parametrize("path", [p for p in EXAMPLES if p.stem != "demo"], ids=lambda p: p.stem)
def test_each_real_data_example_resolves_on_the_shared_data(path, shared_data, tmp_path, capsys):
    result = run(path, tmp_path / "run", dry_run=True, progress=False, variables={"DATA": str(shared_data)})
    assert [r["status"] for r in result.plan] == ["run"] * len(result.plan)
    assert not (tmp_path / "run").exists()
    assert "report" in capsys.readouterr().out
