"""benchmarks/nnunet_peer.py (budget, nnU-Net log parsing, raw folder) and experts.py's nnU-Net table.

nnU-Net itself is not needed: its commands run in their own venv (``nnunet_peer.py --smoke``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from benchmarks import experts
from benchmarks import nnunet_peer as peer
from medalloy.data.synth import generate_dataset
from medalloy.errors import MedalloyError

BENCH = Path(peer.__file__).resolve().parent


# -- budget --------------------------------------------------------------------------------------
def test_plan_budget_short_epochs_when_budget_small() -> None:
    # (600 - 6) / 0.36 = 1650 iterations < 250 * 10 -> 10 epochs of 165
    assert peer.plan_budget(600, 0.36, warmup_seconds=6) == (165, 10)
    # with 1.4 s between epochs: 59.4 - 1.4 = 58 s per epoch -> 161 iterations
    assert peer.plan_budget(600, 0.36, epoch_overhead=1.4, warmup_seconds=6) == (161, 10)


def test_plan_budget_picks_the_epoch_count_that_wastes_least() -> None:
    # JSRT's calibration: 10 epochs of floor((59.16 - 0.95) / 6.474) = 8 use 80 iterations (~535 s);
    # 11 epochs of 8 fit too (88 iterations, ~589 s); 12 of 7 = 84, 13 of 6 = 78 ... 20 of 4 = 80
    assert peer.plan_budget(600, 6.474, epoch_overhead=0.95, warmup_seconds=8.4) == (8, 11)


def test_plan_budget_keeps_nnunet_epoch_length_when_budget_large() -> None:
    # 3600 / (250 * 0.3) = 48 epochs of nnU-Net's 250; with 3 s between epochs 3600 / 78 -> 46
    assert peer.plan_budget(3600, 0.3) == (250, 48)
    assert peer.plan_budget(3600, 0.3, epoch_overhead=3) == (250, 46)
    # exactly 250 * 10 -> the default length already
    assert peer.plan_budget(2500, 1.0) == (250, 10)


def test_plan_budget_tiny_and_exhausted_budgets() -> None:
    assert peer.plan_budget(10, 2.0) == (1, 5)  # 5 iterations: 5 epochs of 1
    # 60 s with 2 s between epochs at 1 s/iteration: 10 epochs of 4 (10 * (4 + 2) = 60)
    assert peer.plan_budget(60, 1.0, epoch_overhead=2) == (4, 10)
    assert peer.plan_budget(5, 1.0, warmup_seconds=30) == (1, 1)  # warm-up eats it all: at least one step
    with pytest.raises(ValueError):
        peer.plan_budget(60, 0.0)


# -- nnU-Net training log -------------------------------------------------------------------------
def _nnunet_log(epochs: list[tuple[str, str, float]]) -> str:
    """Lines as nnU-Net's print_to_log_file writes them: '<datetime>: <message> '."""
    lines = ["", "2026-01-01 10:00:00.000000: This is the configuration used by this training: "]
    for start, end, took in epochs:
        n = len([ln for ln in lines if ": Epoch " in ln and "time" not in ln])
        lines += [
            f"2026-01-01 {start}: Epoch {n} ",
            f"2026-01-01 {start}: Current learning rate: 0.01 ",
            f"2026-01-01 {end}: train_loss -0.5 ",
            f"2026-01-01 {end}: Epoch time: {took} s ",
        ]
    return "\n".join(lines) + "\n"


def test_calibration_timing_from_epoch_starts() -> None:
    # epoch 0 starts 10:00:05, epoch 1 at 10:00:25 (20 s incl. warm-up), epoch 2 at 10:00:37 (12 s)
    text = _nnunet_log([("10:00:05.000000", "10:00:24.000000", 19.0), ("10:00:25", "10:00:36.500000", 11.5), ("10:00:37.000000", "10:00:48.000000", 11.0)])
    per_iter, overhead, warmup = peer.calibration_timing(text, iterations=30)
    assert per_iter == pytest.approx(11.5 / 30)  # epoch 1: 10:00:25 -> 10:00:36.5
    assert overhead == pytest.approx(0.5)  # epoch 1's end -> epoch 2's start
    assert warmup == pytest.approx(20.0 - 12.0)
    parsed = peer.parse_training_log(text)
    assert parsed["epoch_times"] == [19.0, 11.5, 11.0]
    assert parsed["starts"] == [5.0, 25.0, 37.0]  # seconds after the log's first line
    assert parsed["ends"] == [24.0, 36.5, 48.0] and parsed["end"] == 48.0


def test_calibration_needs_three_epochs() -> None:
    text = _nnunet_log([("10:00:05.000000", "10:00:24.000000", 19.0), ("10:00:25.000000", "10:00:36.000000", 11.0)])
    with pytest.raises(ValueError, match="needs 3"):
        peer.calibration_timing(text, iterations=30)


def test_training_seconds_spans_first_start_to_last_end() -> None:
    text = _nnunet_log([("10:00:05.500000", "10:00:20.000000", 14.5), ("10:00:21.000000", "10:01:05.250000", 44.25)])
    assert peer.training_seconds(text) == pytest.approx(59.75)
    with pytest.raises(ValueError):
        peer.training_seconds("2026-01-01 10:00:00.000000: nothing trained \n")


# -- raw dataset ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset("Dataset902_SynthCXR", tmp_path_factory.mktemp("data"), cases_per_source=3, test_cases_per_source=0, progress=False)


SPLIT = {"train": ["siteA_tr000", "siteA_tr001", "siteB_tr000"], "val": ["siteB_tr001"], "test": ["siteA_tr002", "siteB_tr002"]}


def test_build_raw_dataset_layout(synth: Path, tmp_path: Path) -> None:
    out = peer.build_raw_dataset(synth, SPLIT, tmp_path, "Dataset902_SynthCXR")
    assert out == tmp_path / "Dataset902_SynthCXR"
    tr = sorted(p.name for p in (out / "imagesTr").iterdir())
    assert tr == sorted(f"{c}_0000.png" for c in SPLIT["train"] + SPLIT["val"])
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == sorted(f"{c}.png" for c in SPLIT["train"] + SPLIT["val"])
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == ["siteA_tr002_0000.png", "siteB_tr002_0000.png"]
    link = out / "imagesTr" / "siteA_tr000_0000.png"
    assert link.is_symlink() and link.resolve() == (synth / "imagesTr" / "siteA_tr000_0000.png").resolve()
    assert (out / "labelsTr" / "siteB_tr001.png").resolve() == (synth / "labelsTr" / "siteB_tr001.png").resolve()
    spec = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    assert spec["numTraining"] == 4  # train + val, never the test cases
    assert spec["labels"] == {"background": 0, "lung": 1, "heart": 2}
    assert spec["channel_names"] == {"0": "XR"} and spec["file_ending"] == ".png" and spec["name"] == "SynthCXR"
    assert "medalloy" not in spec  # its case list names cases that are not in this folder


def test_build_raw_dataset_refuses_overlap_and_existing(synth: Path, tmp_path: Path) -> None:
    bad = {**SPLIT, "test": ["siteB_tr001"]}
    with pytest.raises(MedalloyError, match="both val and test"):
        peer.build_raw_dataset(synth, bad, tmp_path, "Dataset902_SynthCXR")
    with pytest.raises(MedalloyError, match="train and test"):
        peer.build_raw_dataset(synth, {**SPLIT, "test": []}, tmp_path, "Dataset902_SynthCXR")
    peer.build_raw_dataset(synth, SPLIT, tmp_path, "Dataset902_SynthCXR")
    with pytest.raises(FileExistsError):
        peer.build_raw_dataset(synth, SPLIT, tmp_path, "Dataset902_SynthCXR")


def test_write_split_is_fold_zero(tmp_path: Path) -> None:
    path = peer.write_split(tmp_path / "Dataset902_SynthCXR", {"train": ["b", "a"], "val": ["c"], "test": ["d"]})
    assert json.loads(path.read_text(encoding="utf-8")) == [{"train": ["a", "b"], "val": ["c"]}]


def test_dataset_folder_name() -> None:
    assert peer.dataset_folder_name(511, "Polyp-Kvasir") == "Dataset511_PolypKvasir"
    assert peer.dataset_folder_name(7, "JSRT") == "Dataset007_JSRT"
    with pytest.raises(ValueError):
        peer.dataset_folder_name(1000, "X")


# -- environment and venv ---------------------------------------------------------------------------
def test_nnunet_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    monkeypatch.setenv("MEDALLOY_NNUNET_EPOCHS", "99")
    env = peer.nnunet_env(tmp_path / "venv", tmp_path, threads=2, iters=30, epochs=3)
    assert env["nnUNet_raw"] == str(tmp_path / "nnUNet_raw")
    assert env["nnUNet_results"] == str(tmp_path / "nnUNet_results")
    assert env["nnUNet_extTrainer"] == str(BENCH / "nnunet")
    assert (BENCH / "nnunet" / "nnUNetTrainerBudget.py").exists()
    assert env["MEDALLOY_NNUNET_ITERS"] == "30" and env["MEDALLOY_NNUNET_EPOCHS"] == "3"
    assert env["OMP_NUM_THREADS"] == "2" and env["PATH"].startswith(str(tmp_path / "venv" / "bin") + os.pathsep)
    assert "PYTHONPATH" not in env  # medalloy's packages must not leak into nnU-Net's venv
    plain = peer.nnunet_env(tmp_path / "venv", tmp_path, threads=1)
    assert "MEDALLOY_NNUNET_EPOCHS" not in plain and "MEDALLOY_NNUNET_ITERS" not in plain


def test_check_venv_names_setup_script(tmp_path: Path) -> None:
    with pytest.raises(MedalloyError, match="setup_venv.sh"):
        peer.check_venv(tmp_path)
    (tmp_path / "bin").mkdir()
    for cmd in ("nnUNetv2_plan_and_preprocess", "nnUNetv2_train", "nnUNetv2_predict"):
        (tmp_path / "bin" / cmd).write_text("", encoding="utf-8")
    assert peer.check_venv(tmp_path) == tmp_path / "bin"


# -- experts.py table ---------------------------------------------------------------------------------
def _row(dice: float, **extra: object) -> dict:
    return {
        "lung": {"dice": dice, "hd95": 3.25},
        "train_minutes": 9.5,
        "images_per_second": 12.0,
        "params": 1000,
        "source": "in",
        "steps": 800,
        "mean_dice": dice,
        **extra,
    }


PEER = {
    "lung": {"dice": 0.91, "hd95": 4.5},
    "train_minutes": 9.1,
    "iterations": 1650,
    "epochs": 10,
    "iterations_per_epoch": 165,
    "batch_size": 12,
    "patch_size": [256, 256],
    "images_per_second": 36.3,
    "mean_dice": 0.91,
    "budget_minutes": 10.0,
    "seed": 0,
}


def test_markdown_without_peer_is_unchanged() -> None:
    md = experts.markdown({"Shenzhen": _row(0.95)}, 10)
    lines = md.splitlines()
    assert "| expert | source | label | Dice | HD95 | target | train min | steps | images/s | params |" in lines
    assert "| Shenzhen | in | lung | 0.950 | 3.25 | >= 0.92 | 9.5 | 800 | 12.0 | 1000 |" in lines
    assert "nnU-Net" not in md


def test_markdown_with_peer_columns_and_summary() -> None:
    rows = {"Shenzhen": _row(0.95, nnunet=PEER), "JSRT": _row(0.96, nnunet={"error": "boom"}), "Polyp-CVC->Polyp-Kvasir": _row(0.5)}
    lines = experts.markdown(rows, 10).splitlines()
    head = "| expert | source | label | Dice | HD95 | target | train min | steps | images/s | params | nnU-Net Dice | nnU-Net HD95 | nnU-Net train min | nnU-Net iterations |"
    assert head in lines
    assert lines[lines.index(head) + 1] == "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    assert "| Shenzhen | in | lung | 0.950 | 3.25 | >= 0.92 | 9.5 | 800 | 12.0 | 1000 | 0.910 | 4.50 | 9.1 | 1650 |" in lines
    assert "| JSRT | in | lung | 0.960 | 3.25 | >= 0.95 | 9.5 | 800 | 12.0 | 1000 | failed | | | |" in lines
    assert any(ln.startswith("| Polyp-CVC->Polyp-Kvasir |") and ln.endswith("| 1000 | | | | |") for ln in lines)
    assert "- Shenzhen: medalloy 0.950 vs nnU-Net 0.910 (+0.040); nnU-Net 10 epochs x 165 iterations, batch 12, patch 256x256, 36.3 images/s" in lines
    assert "- JSRT: nnU-Net failed: boom" in lines


def test_markdown_peer_mean_row() -> None:
    row = _row(0.8, nnunet={**PEER, "mean_dice": 0.83})
    lines = experts.markdown({"ACDC": row}, 10).splitlines()
    assert "| ACDC | in | mean | 0.800 | | >= 0.85 | | | | | 0.830 | | | |" in lines


def test_same_setting_keeps_only_matching_peer_rows() -> None:
    assert experts._same_setting(PEER, 10.0, 0)
    assert not experts._same_setting(PEER, 5.0, 0)
    assert not experts._same_setting(PEER, 10.0, 1)
    assert not experts._same_setting({"error": "x", "budget_minutes": 10.0, "seed": 0}, 10.0, 0)
    assert not experts._same_setting(None, 10.0, 0)


# -- experts.py wiring ---------------------------------------------------------------------------------
def _fake_venv(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    for cmd in ("nnUNetv2_plan_and_preprocess", "nnUNetv2_train", "nnUNetv2_predict"):
        (root / "bin" / cmd).write_text("", encoding="utf-8")
    return root


def test_nnunet_only_adds_peer_rows_to_existing_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "results.json").write_text(json.dumps({"Shenzhen": _row(0.95)}), encoding="utf-8")
    calls = []

    def fake_peer(name, data, work, budget, seed, venv, threads):  # noqa: ANN001, ANN202
        calls.append((name, budget, seed, venv))
        return {**PEER, "budget_minutes": budget, "seed": seed}

    monkeypatch.setattr(experts, "run_peer", fake_peer)
    venv = _fake_venv(tmp_path / "venv")
    argv = ["--data", str(tmp_path), "--results", str(results), "--nnunet-venv", str(venv), "--budget-minutes", "10"]
    # a medalloy row is needed for every expert asked for
    assert experts.main([*argv, "--nnunet-only", "--only", "Shenzhen", "JSRT"]) == 1
    assert calls == []
    assert experts.main([*argv, "--nnunet-only", "--only", "Shenzhen"]) == 0
    assert calls == [("Shenzhen", 10.0, 0, venv)]
    rows = json.loads((results / "results.json").read_text(encoding="utf-8"))
    assert rows["Shenzhen"]["nnunet"]["lung"] == {"dice": 0.91, "hd95": 4.5}
    assert rows["Shenzhen"]["lung"] == {"dice": 0.95, "hd95": 3.25}  # medalloy's row untouched
    assert "| 0.910 | 4.50 | 9.1 | 1650 |" in (results / "results.md").read_text(encoding="utf-8")


def test_with_nnunet_refuses_missing_venv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--data", str(tmp_path), "--results", str(tmp_path / "r"), "--nnunet-venv", str(tmp_path / "none"), "--with-nnunet"]
    assert experts.main(argv) == 1
    assert "setup_venv.sh" in capsys.readouterr().err


def test_run_peer_records_a_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("nnUNetv2_train exited with code 1\nmore")

    monkeypatch.setattr(experts, "dataset_path", lambda name, data, work: tmp_path)
    monkeypatch.setattr(experts, "splits", lambda name, ds_path, seed: {"train": ["a"], "val": [], "test": ["b"]})
    monkeypatch.setattr(peer, "run_nnunet", boom)
    row = experts.run_peer("JSRT", tmp_path, tmp_path, 10.0, 3, tmp_path, None)
    assert row == {"error": "nnUNetv2_train exited with code 1", "budget_minutes": 10.0, "seed": 3}


def test_model_facts_read_an_nnunet_checkpoint_without_unpickling_code(tmp_path):
    # An nnU-Net-like checkpoint: shared tensors, numpy scalars in its log, a torch.device in its args.
    import os
    import subprocess

    import numpy as np
    import torch

    conv = torch.zeros(4, 3)
    ck = {
        "network_weights": {"conv.weight": conv, "all_modules.0.weight": conv, "bias": torch.zeros(4), "steps": torch.tensor(3)},
        "logging": {"ema_fg_dice": [np.float64(0.5), np.float32(0.25)]},
        "init_args": {"device": torch.device("cpu"), "fold": 0},
        "current_epoch": 3,
    }
    path = tmp_path / "checkpoint_final.pth"
    torch.save(ck, path)
    facts = peer._model_facts(Path(sys.executable).parent, dict(os.environ), path)
    assert facts["params"] == 16 and facts["torch"] == torch.__version__

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"network_weights": {}, "x": Evil()}, path)
    with pytest.raises(subprocess.CalledProcessError) as exc:
        peer._model_facts(Path(sys.executable).parent, dict(os.environ), path)
    assert "unpickled!" not in exc.value.stdout and "weights_only" in exc.value.stderr


def test_model_facts_script_does_nothing_when_nnunet_imports_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # nnU-Net imports every module of its nnUNet_extTrainer folder while looking for the trainer, with its own argv
    import importlib.util

    monkeypatch.setattr(sys, "argv", ["nnUNetv2_train", "502", "2d", "0"])
    spec = importlib.util.spec_from_file_location("facts", BENCH / "nnunet" / "facts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(module.main)
