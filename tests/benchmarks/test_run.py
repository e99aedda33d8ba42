"""benchmarks/run.py: a study's arms from their configs, each with its manifest (tiny configs)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from benchmarks import run as bench_run

TOY = {
    "name": "toy",
    "device": "cpu",
    "datasets": {"cxr": {"synthetic": {"name": "SynthCXR", "cases_per_source": 3, "test_cases_per_source": 1}}},
    "stages": {"experts": {"train": {"steps": 2, "val_every": 2}}},
}


def _study(tmp: Path, arms: dict[str, dict]) -> Path:
    folder = tmp / "configs" / "toy-study"
    folder.mkdir(parents=True)
    for name, cfg in arms.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return tmp / "configs"


def _main(tmp: Path, configs: Path, *args: str) -> int:
    return bench_run.main(["toy-study", "--configs", str(configs), "--results", str(tmp / "results"), "--work", str(tmp / "work"), "-q", *args])


@pytest.mark.slow
def test_a_pipeline_arm_runs_and_its_manifest_says_what_ran(tmp_path):
    configs = _study(tmp_path, {"expert": TOY, "other": {**TOY, "seed": 1}})
    assert _main(tmp_path, configs, "--only", "expert") == 0
    m = json.loads((tmp_path / "results" / "toy-study" / "manifests" / "expert.json").read_text(encoding="utf-8"))
    config = configs / "toy-study" / "expert.yaml"
    assert (m["study"], m["arm"], m["config_sha256"]) == ("toy-study", "expert", hashlib.sha256(config.read_bytes()).hexdigest())
    assert m["variables"]["DATA"]  # recorded, not hashed
    assert m["steps"] == {"experts/cxr": 2}  # from the run itself
    assert set(m["stage_minutes"]) == {"experts"} and m["minutes"] == pytest.approx(sum(m["stage_minutes"].values()))
    assert m["machine"]["cores"] >= 1 and m["machine"]["cpu"] and m["medalloy"] and m["date"].startswith("20")
    assert (tmp_path / "results" / "toy-study" / "expert" / "pipeline.yaml").is_file()
    assert not (tmp_path / "results" / "toy-study" / "manifests" / "other.json").exists()  # --only


def test_a_study_config_runs_its_benchmark_module_with_its_arguments(tmp_path, monkeypatch):
    configs = _study(tmp_path, {"help": {"script": "universal_size", "args": ["--help"], "description": "the script's help"}})
    (configs / "toy-study" / "_table.yaml").write_text("a: 1\n", encoding="utf-8")  # read by the script, not an arm
    calls = []
    monkeypatch.setattr(bench_run, "_call", lambda cmd: calls.append(cmd) or 0)
    assert _main(tmp_path, configs) == 0
    assert calls[0][1:] == ["-m", "benchmarks.universal_size", "--help"]
    m = json.loads((tmp_path / "results" / "toy-study" / "manifests" / "help.json").read_text(encoding="utf-8"))
    assert m["command"] == "python -m benchmarks.universal_size --help" and m["steps"] is None
    assert m["tables"] == {"_table.yaml": hashlib.sha256(b"a: 1\n").hexdigest()}  # a change to the table shows in the manifest


@pytest.mark.parametrize(
    ("arms", "args", "message"),
    [
        ({"a": {"oops": 1}}, [], "a.yaml: an arm is a pipeline"),
        ({"a": {"script": "nope", "args": []}}, [], "script 'nope' is not a module"),
        ({"a": {"script": "experts", "argz": []}}, [], "unknown keys ['argz']"),
        ({"a": {"script": "experts", "args": ["${NOPE}"]}}, [], "${NOPE} has no value; pass --var NOPE="),
        ({"a": TOY}, ["--only", "b"], "no arm b (arms: a)"),
    ],
)
def test_a_config_that_cannot_run_is_one_line_naming_its_file(tmp_path, capsys, arms, args, message):
    configs = _study(tmp_path, arms)
    assert _main(tmp_path, configs, *args) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()  # nothing written


def test_an_unknown_study_lists_the_studies(tmp_path, capsys):
    configs = _study(tmp_path, {"a": TOY})
    assert bench_run.main(["nope", "--configs", str(configs)]) == 1
    assert "no such study (studies: toy-study)" in capsys.readouterr().err


def test_every_shipped_study_lists_its_arms():
    for study in sorted(p.name for p in bench_run.CONFIGS.iterdir() if p.is_dir()):
        assert bench_run.main([study, "--list"]) == 0


def test_the_readme_chest_xray_arm_is_the_example_users_run():
    root = bench_run.ROOT
    arm = yaml.safe_load((root / "benchmarks" / "configs" / "pipeline-chest-xray" / "chest-xray.yaml").read_text(encoding="utf-8"))
    assert arm == yaml.safe_load((root / "examples" / "chest-xray.yaml").read_text(encoding="utf-8"))


def test_an_arm_at_other_seeds_is_its_own_arm_with_its_own_results(tmp_path, monkeypatch):
    import medalloy.pipeline

    configs = _study(tmp_path, {"bench": {"script": "experts", "args": ["--seed", "0", "--only", "JSRT"]}, "pipe": TOY})
    calls, seeds = [], []
    monkeypatch.setattr(bench_run, "_call", lambda cmd: calls.append(cmd) or 0)

    def fake_pipeline(cfg, out, progress=True):
        seeds.append(cfg.seed)
        Path(out).mkdir(parents=True)
        (Path(out) / "pipeline.json").write_text(
            json.dumps({"stages": {"experts": {"seconds": 60.0, "models": [{"name": "experts/cxr", "steps": 2}]}}}), encoding="utf-8"
        )

    monkeypatch.setattr(medalloy.pipeline, "run", fake_pipeline)
    assert _main(tmp_path, configs, "--seed", "1", "2") == 0
    results = tmp_path / "results" / "toy-study"
    assert [c[3:] for c in calls] == [["--seed", str(s), "--only", "JSRT", "--results", str(results / f"seed{s}")] for s in (1, 2)]
    assert seeds == [1, 2]
    names = sorted(p.stem for p in (results / "manifests").glob("*.json"))
    assert names == ["bench-seed1", "bench-seed2", "pipe-seed1", "pipe-seed2"]
    assert json.loads((results / "manifests" / "pipe-seed2.json").read_text(encoding="utf-8"))["command"].endswith("--only pipe --seed 2")


def test_a_study_config_without_a_seed_says_how_to_add_one(tmp_path, capsys):
    configs = _study(tmp_path, {"help": {"script": "universal_size", "args": []}})
    assert _main(tmp_path, configs, "--seed", "1") == 1
    assert "add `--seed, '0'` to args" in capsys.readouterr().err


def test_every_shipped_arm_has_the_manifest_of_its_config_as_it_is():
    """A result says what ran: each arm's manifest hashes the config file as committed (edit a
    config and its results are stale until the arm reruns); archived results keep theirs too."""
    results = bench_run.RESULTS
    for study in sorted(p.name for p in bench_run.CONFIGS.iterdir() if p.is_dir()):
        for arm, config in bench_run.arms(study).items():
            m = json.loads((results / study / "manifests" / f"{arm}.json").read_text(encoding="utf-8"))
            assert m["config_sha256"] == hashlib.sha256(config.read_bytes()).hexdigest(), f"{study}/{arm}: config changed since its results"
            assert m["commit"] and m["date"] and m["machine"], f"{study}/{arm}"
    for folder in sorted((results / "archive").iterdir()):
        assert (folder / "README.md").is_file() and json.loads((folder / "manifest.json").read_text(encoding="utf-8"))["commit"], folder.name
