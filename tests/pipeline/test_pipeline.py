"""``medalloy pipeline`` on a two-stage toy (an expert, its student) plus evaluation and report, on
tiny synthetic data; one reference run is shared: reuse, partial rerun, SIGKILL during and between
stages, changed data, bad inputs, the report's static checks."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from medalloy.data.synth import generate_dataset
from medalloy.errors import MedalloyError
from medalloy.pipeline import load_pipeline, run
from tests.subprocs import HERE, assert_bit_identical, checkpoint_tensors, medalloy
from tests.subprocs import run as run_proc

pytestmark = pytest.mark.slow
KILL = HERE / "kill_in_pipeline.py"
STEPS = {"train": {"steps": 4, "val_every": 2, "log_every": 1}}


def _toy(data: Path, **changes) -> dict:
    cfg = {
        "name": "toy",
        "device": "cpu",
        "held_out": 0.25,
        "datasets": {"cxr": {"path": str(data)}},
        "stages": {
            "experts": {**STEPS},
            "distill": {"teacher": "experts", **STEPS},
            "evaluate": {"latency_runs": 1},
            "report": {},
        },
    }
    for stage, settings in changes.items():
        cfg["stages"][stage] = {**cfg["stages"][stage], **settings}
    return cfg


def _write(tmp: Path, cfg: dict, name: str = "toy.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def _pipeline(config: Path, out: Path, *extra: str, when: str | None = None):
    cmd = medalloy("pipeline", str(config), "--out", str(out), *extra)
    if when is not None:
        cmd = [cmd[0], str(KILL), when, *cmd[3:]]
    res = run_proc(cmd, cwd=config.parent)
    # -q silences the bars, not the stage lines; they go to stdout
    return res


def _weights(out: Path) -> dict[str, dict]:
    return {m: checkpoint_tensors(out / m / "checkpoints" / "last.safetensors") for m in ("experts/cxr", "distill/cxr")}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    # no imagesTs: the pipeline holds out a quarter of the cases itself
    return generate_dataset("SynthCXR", tmp_path_factory.mktemp("data"), cases_per_source=4, test_cases_per_source=0, progress=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data) -> tuple[Path, Path]:
    """(config, run folder) of one uninterrupted run."""
    tmp = tmp_path_factory.mktemp("ref")
    config = _write(tmp, _toy(data))
    res = _pipeline(config, tmp / "run")
    assert res.returncode == 0, res.stderr
    return config, tmp / "run"


def _copy(reference: tuple[Path, Path], tmp: Path) -> Path:
    out = tmp / "run"
    shutil.copytree(reference[1], out)
    return out


def _lines(res) -> dict[str, str]:
    """The stage lines of the output, the last per stage: {stage: text}."""
    out = {}
    for line in res.stdout.splitlines():
        if line.startswith("[medalloy pipeline] ") and ": " in line:
            stage, text = line.removeprefix("[medalloy pipeline] ").split(": ", 1)
            out.setdefault(stage, "")
            out[stage] += text + "\n"
    return out


def test_the_reference_run_trains_each_stage_from_the_one_before(reference):
    _, out = reference
    state = json.loads((out / "pipeline.json").read_text(encoding="utf-8"))
    assert [s["status"] for s in state["stages"].values()] == ["done"] * 4
    student = json.loads((out / "distill" / "cxr" / "run.json").read_text(encoding="utf-8"))
    assert Path(student["teacher"]).resolve() == (out / "experts" / "cxr").resolve()
    assert student["steps"] == 4
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert {(r["model"], r["dataset"]) for r in report["rows"]} == {("experts/cxr", "cxr"), ("distill/cxr", "cxr")}
    # the held-out quarter (by patient) is scored and never trained or selected on
    held = set(json.loads((out / "evaluate" / "experts-cxr" / "cxr" / "summary.json").read_text(encoding="utf-8"))["per_case"])
    assert len(held) == 2
    for run_dir in (out / "experts" / "cxr", out / "distill" / "cxr"):
        split = json.loads((run_dir / "split.json").read_text(encoding="utf-8"))["datasets"]["SynthCXR"]
        assert not held & (set(split["train"]) | set(split["val"])) and len(split["train"]) + len(split["val"]) == 6


def test_a_rerun_reuses_every_stage_and_trains_nothing(reference, tmp_path):
    out = _copy(reference, tmp_path)
    before = _weights(out)
    res = _pipeline(reference[0], out)
    assert res.returncode == 0, res.stderr
    lines = _lines(res)
    assert all(lines[s].startswith("reused") for s in ("experts", "distill", "evaluate", "report")), res.stdout
    for m, tensors in _weights(out).items():
        assert_bit_identical(before[m], tensors)


def test_changing_one_stage_reruns_it_and_the_stages_below_only(reference, data, tmp_path):
    out = _copy(reference, tmp_path)
    expert_ckpt = (out / "experts" / "cxr" / "checkpoints" / "last.safetensors").stat().st_mtime_ns
    config = _write(tmp_path, _toy(data, distill={"train": {"steps": 6, "val_every": 2, "log_every": 1}}))
    dry = _pipeline(config, out, "--dry-run")
    table = dry.stdout.splitlines()
    assert [ln.split()[2] for ln in table[1:]] == ["reuse", "run", "run", "run"], dry.stdout
    assert "its settings changed" in table[2] and "reads distill" in table[3]
    res = _pipeline(config, out)
    assert res.returncode == 0, res.stderr
    lines = _lines(res)
    assert lines["experts"].startswith("reused") and "its settings changed" in lines["distill"]
    assert (out / "experts" / "cxr" / "checkpoints" / "last.safetensors").stat().st_mtime_ns == expert_ckpt
    assert json.loads((out / "distill" / "cxr" / "run.json").read_text(encoding="utf-8"))["steps"] == 6


@pytest.mark.parametrize("when", ["distill:3", "expert:3", "after:experts"])
def test_a_killed_run_started_again_ends_as_the_uninterrupted_one(reference, tmp_path, when):
    config, ref = reference
    out = tmp_path / "run"
    killed = _pipeline(config, out, when=when)
    assert killed.returncode == -9, killed.stderr
    state = json.loads((out / "pipeline.json").read_text(encoding="utf-8"))
    assert "report" not in state["stages"]
    res = _pipeline(config, out)
    assert res.returncode == 0, res.stderr
    if when == "after:experts":
        assert _lines(res)["experts"].startswith("reused")
    elif when == "distill:3":
        assert _lines(res)["experts"].startswith("reused") and _lines(res)["distill"].startswith("resumed")
    for m, tensors in _weights(out).items():
        assert_bit_identical(_weights(ref)[m], tensors)
    ref_report = json.loads((ref / "report.json").read_text(encoding="utf-8"))["rows"]
    new_report = json.loads((out / "report.json").read_text(encoding="utf-8"))["rows"]
    assert [r["summary"] for r in new_report] == [r["summary"] for r in ref_report]


def test_a_changed_dataset_reruns_what_reads_it_and_says_so(reference, data, tmp_path):
    copy = tmp_path / data.name
    shutil.copytree(data, copy)
    out = _copy(reference, tmp_path)
    config = _write(tmp_path, _toy(copy))
    same = _pipeline(config, out, "--dry-run")
    assert [ln.split()[2] for ln in same.stdout.splitlines()[1:]] == ["reuse"] * 4, same.stdout  # the content, not the path, is the key
    image = sorted((copy / "imagesTr").iterdir())[0]
    image.write_bytes(image.read_bytes() + b"\0")
    changed = _pipeline(config, out, "--dry-run")
    rows = changed.stdout.splitlines()
    assert [ln.split()[2] for ln in rows[1:]] == ["run"] * 4
    assert "dataset cxr changed since it ran" in rows[1]


def test_the_report_is_static_and_holds_every_models_numbers(reference):
    _, out = reference
    text = (out / "report.md").read_text(encoding="utf-8")
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    header = next(ln for ln in text.splitlines() if ln.startswith("| dataset | task | source |"))
    assert [c.strip() for c in header.strip("|").split("|")][3:] == ["experts", "distill"]
    for row in report["rows"]:
        lung = row["summary"]["classes"]["lung"]["dice"]["mean"]
        assert f"{lung:.3f} /" in text
        assert row["params"] > 0 and row["latency_ms"]
    rec = report["recommendation"]["cxr"]
    assert rec["recommended"] in ("experts/cxr", "distill/cxr")
    assert "## Model card" in text and "research" in text


def test_only_refuses_a_stage_whose_inputs_have_not_run(data, tmp_path):
    config = _write(tmp_path, _toy(data))
    with pytest.raises(MedalloyError, match="reads 'experts', which has not finished"):
        run(config, tmp_path / "run", only=["distill"], progress=False)


def test_a_dry_run_writes_nothing(data, tmp_path):
    config = _write(tmp_path, _toy(data))
    result = run(config, tmp_path / "run", dry_run=True, progress=False)
    assert not (tmp_path / "run").exists()
    assert [r["status"] for r in result.plan] == ["run"] * 4


def test_bad_inputs_fail_in_one_line_before_anything_trains(data, tmp_path):
    bad = _toy(data)
    bad["stages"]["experts"]["trian"] = {"steps": 3}
    with pytest.raises(MedalloyError, match=r"toy.yaml.*stages\.experts\.experts\.trian.*Extra inputs"):
        load_pipeline(_write(tmp_path, bad))
    bad = _toy(data, distill={"teacher": "universal"})
    with pytest.raises(MedalloyError, match="no such stage"):
        run(bad, tmp_path / "a", progress=False)
    bad = _toy(data)
    bad["datasets"]["endo"] = {"path": str(data)}
    bad["stages"]["experts"]["datasets"] = ["cxr"]
    bad["stages"]["distill"]["datasets"] = ["cxr", "endo"]
    with pytest.raises(MedalloyError, match="teacher 'experts' does not learn endo"):
        run(bad, tmp_path / "b", progress=False)
    assert not (tmp_path / "b" / "experts").exists()
    with pytest.raises(MedalloyError, match=r"\$\{NOPE\} is not set"):
        load_pipeline(_write(tmp_path, {**_toy(data), "datasets": {"cxr": {"path": "${NOPE}/x"}}}, "vars.yaml"))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "mine.txt").write_text("keep")
    with pytest.raises(MedalloyError, match="holds no pipeline.json"):
        run(_toy(data), tmp_path / "c", progress=False)
    assert (tmp_path / "c" / "mine.txt").read_text() == "keep"


def test_a_dataset_that_fails_its_check_stops_the_pipeline_before_training(data, tmp_path):
    broken = tmp_path / data.name
    shutil.copytree(data, broken)
    next((broken / "labelsTr").iterdir()).unlink()
    with pytest.raises(MedalloyError, match="fails its check"):
        run(_toy(broken), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "experts").exists()


def test_the_html_report_is_one_self_contained_page(reference):
    _, out = reference
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count("<table>") >= 3 and "<th>experts</th>" in page
    sources = re.findall(r'\b(?:src|href)="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources), sources[:3]
    assert not re.search(r'\b(?:src|href)="https?:', page)
    # every overlay and curve of the markdown is in the page
    assert len(sources) == len(re.findall(r"!\[[^\]]*\]\(", (out / "report.md").read_text(encoding="utf-8")))


def _browser() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(_browser() is None, reason="no headless browser here (.ci/run installs chromium where it can)")
def test_the_html_report_renders_its_tables_in_a_browser(reference, tmp_path):
    from PIL import Image

    _, out = reference
    shot = tmp_path / "shot.png"
    cmd = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}", "--window-size=1280,1600", (out / "report.html").as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    img = np.asarray(Image.open(shot).convert("L"))
    assert img.shape == (1600, 1280)
    ink = img < 200  # text and table borders on a white page
    assert 0.005 < ink.mean() < 0.5
    # tables: many dark rows across the page's width, not a blank or an error page
    assert (ink.mean(axis=1) > 0.05).sum() > 20


def test_leave_one_source_out_scores_each_source_with_models_that_never_saw_it(data, tmp_path):
    lung = generate_dataset("SynthCXRLung", tmp_path / "lung", cases_per_source=4, test_cases_per_source=0, progress=False)
    cfg = _toy(data)
    cfg["datasets"]["lungonly"] = {"path": str(lung)}
    cfg["stages"] = {
        "experts": {**STEPS},
        "universal": {**STEPS, "patch_size": 64},
        "distill": {"teacher": "universal", **STEPS},
        "evaluate": {"latency_runs": 1, "overlays": False, "leave_one_source_out": True},
        "report": {"tolerance": 1.0},
    }
    result = run(cfg, tmp_path / "run", progress=False)
    cross = json.loads((tmp_path / "run" / "evaluate" / "results.json").read_text(encoding="utf-8"))["cross_source"]
    by = {(r["dataset"], r["source"], r["model"]): r for r in cross}
    # the chest set's siteA: the lung-only expert (lung only), the chest expert retrained on siteB, a universal model without siteA
    assert by[("cxr", "siteA", "experts/lungonly")]["tasks"] == ["lung"]
    assert by[("cxr", "siteA", "evaluate/cross-source/cxr-siteA/experts/cxr")]["tasks"] == ["lung", "heart"]
    assert by[("cxr", "siteA", "universal without cxr/siteA")]["tasks"] == ["lung", "heart"]
    assert {k[:2] for k in by} == {("cxr", "siteA"), ("cxr", "siteB"), ("lungonly", "siteC"), ("lungonly", "siteD")}
    # scored on that source's training cases only, never on the held-out ones
    held = set(
        result.stages["evaluate"]
        and json.loads((tmp_path / "run" / "evaluate" / "experts-cxr" / "cxr" / "summary.json").read_text(encoding="utf-8"))["per_case"]
    )
    scored = json.loads(
        (tmp_path / "run" / "evaluate" / "cross-source" / "cxr-siteA" / "universal" / "scores" / "universal_without_cxr-siteA" / "summary.json").read_text(
            encoding="utf-8"
        )
    )
    assert scored["per_case"] and not held & set(scored["per_case"]) and all(scored["sources"][c] == "siteA" for c in scored["per_case"])
    retrained = json.loads((tmp_path / "run" / "evaluate" / "cross-source" / "cxr-siteA" / "universal" / "split.json").read_text(encoding="utf-8"))["datasets"]
    assert not any(cid in scored["per_case"] for part in retrained.values() for ids in part.values() for cid in ids)
    # the student is rebuilt too: distilled, on the cases left, from the universal model rebuilt without the source
    assert by[("cxr", "siteA", "distill without cxr/siteA")]["tasks"] == ["lung", "heart"]
    student = json.loads((tmp_path / "run" / "evaluate" / "cross-source" / "cxr-siteA" / "distill" / "run.json").read_text(encoding="utf-8"))
    assert Path(student["teacher"]) == tmp_path / "run" / "evaluate" / "cross-source" / "cxr-siteA" / "universal"
    assert Path(student["dataset"]) == data  # the chest set keeps siteB, so the student is asked as it
    own = json.loads((tmp_path / "run" / "evaluate" / "cross-source" / "cxr-siteA" / "distill" / "split.json").read_text(encoding="utf-8"))["datasets"]
    assert not any(cid in scored["per_case"] for part in own.values() for ids in part.values() for cid in ids)
    report = json.loads((tmp_path / "run" / "report.json").read_text(encoding="utf-8"))
    assert report["recommendation"]["cxr"]["rule"] == "leave-one-source-out Dice"
    # the smallest model competes with its teacher's rows, and deploys as its ONNX export
    assert report["recommendation"]["cxr"]["recommended"] == "distill"
    student_dice = np.mean([r["summary"]["mean"]["dice"]["mean"] for r in cross if r["stage"] == "distill" and r["dataset"] == "cxr"])
    assert report["recommendation"]["cxr"]["score"] == pytest.approx(student_dice)
    assert "## Sources never trained on" in (tmp_path / "run" / "report.md").read_text(encoding="utf-8")


def test_experts_in_parallel_processes_end_as_sequential_ones_on_one_thread(data, tmp_path):
    endo = generate_dataset("SynthEndo", tmp_path / "endo", cases_per_source=3, test_cases_per_source=1, progress=False)
    outs = {}
    for jobs in (1, 2):
        cfg = {**_toy(data), "jobs": jobs, "stages": {"experts": {**STEPS}}}
        cfg["datasets"]["endo"] = {"path": str(endo)}
        res = _pipeline(_write(tmp_path, cfg, f"jobs{jobs}.yaml"), tmp_path / f"run{jobs}")  # --threads 1: one thread each way
        assert res.returncode == 0, res.stderr
        outs[jobs] = tmp_path / f"run{jobs}"
    assert "2 experts, 2 at a time" in res.stdout
    for d in ("cxr", "endo"):
        ckpt = Path("experts") / d / "checkpoints" / "last.safetensors"
        assert_bit_identical(checkpoint_tensors(outs[1] / ckpt), checkpoint_tensors(outs[2] / ckpt))


def test_a_finished_stage_whose_output_was_deleted_runs_again(reference, tmp_path):
    out = _copy(reference, tmp_path)
    shutil.rmtree(out / "distill" / "cxr")
    dry = _pipeline(reference[0], out, "--dry-run")
    rows = dry.stdout.splitlines()
    # what read the lost output runs again too: a budgeted stage trained again ends on other weights
    assert [ln.split()[2] for ln in rows[1:]] == ["reuse", "run", "run", "run"], dry.stdout
    assert "its output distill/cxr is missing" in rows[2] and "it reads distill, which runs again" in rows[3]
    assert "which runs again" in rows[4]
    only_report = _copy(reference, tmp_path / "report")
    (only_report / "report.md").unlink()
    rows = _pipeline(reference[0], only_report, "--dry-run").stdout.splitlines()
    assert [ln.split()[2] for ln in rows[1:]] == ["reuse", "reuse", "reuse", "run"] and "its output report.md is missing" in rows[4]


def test_under_torchrun_the_stages_train_on_every_rank_and_rank_0_writes(reference, data, tmp_path):
    from tests.subprocs import torchrun

    config = _write(tmp_path, _toy(data))
    args = ("-m", "medalloy", "--threads", "1", "-q", "pipeline", str(config), "--out", str(tmp_path / "run"))
    res = run_proc(torchrun(*args), cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    state = json.loads((tmp_path / "run" / "pipeline.json").read_text(encoding="utf-8"))
    assert [(n, s["status"]) for n, s in state["stages"].items()] == [(n, "done") for n in ("experts", "distill", "evaluate", "report")]
    for stage in ("experts", "distill", "evaluate", "report"):
        assert res.stdout.count(f"[medalloy pipeline] {stage}: started") == 1, res.stdout  # rank 0 says it, once
    assert (tmp_path / "run" / "report.md").is_file() and (tmp_path / "run" / "evaluate" / "results.json").is_file()
    # two ranks, each its own batches: other weights than the one-process reference, same keys
    ours, theirs = _weights(tmp_path / "run"), _weights(reference[1])
    assert sorted(ours["experts/cxr"]) == sorted(theirs["experts/cxr"])
    assert any(not (ours["experts/cxr"][k] == theirs["experts/cxr"][k]).all() for k in ours["experts/cxr"])
    ref_state = json.loads((reference[1] / "pipeline.json").read_text(encoding="utf-8"))
    assert {n: s["key"] for n, s in state["stages"].items()} == {n: s["key"] for n, s in ref_state["stages"].items()}
    again = run_proc(torchrun(*args), cwd=tmp_path, timeout=600)
    assert again.returncode == 0 and again.stdout.count("reused") == 4 and "started" not in again.stdout, again.stdout + again.stderr[-2000:]
    # leave-one-source-out retrains inside evaluate, on rank 0 alone: refused in one line before training
    loso = _write(tmp_path, _toy(data, evaluate={"leave_one_source_out": True}), "loso.yaml")
    refused = run_proc(torchrun("-m", "medalloy", "--threads", "1", "-q", "pipeline", str(loso), "--out", str(tmp_path / "loso")), cwd=tmp_path, timeout=300)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("medalloy: error")]
    assert refused.returncode != 0 and len(errors) == 1 and "run that pipeline without torchrun" in errors[0], refused.stderr[-2000:]
    assert not (tmp_path / "loso" / "experts").exists()
