"""nnU-Net v2 as the peer of ``benchmarks/experts.py``: same cases, same budget, same metric code.

    python -m benchmarks.experts --with-nnunet [--nnunet-venv PATH]     (the benchmark, see README.md)
    python -m benchmarks.nnunet_peer --smoke [--venv PATH]              (a one-minute check of the chain)

For one expert, ``run_nnunet`` runs nnU-Net's own commands in nnU-Net's own virtual environment
(``benchmarks/nnunet/setup_venv.sh``), never medalloy's, in a work folder of its own:

1. raw dataset: ``nnUNet_raw/DatasetNNN_Name`` with the train + val cases of the split (symlinks to
   the medalloy dataset's files, which are already in nnU-Net's raw format) in imagesTr/labelsTr and
   the test images in imagesTs; ``dataset.json`` says numTraining = train + val.
2. ``nnUNetv2_plan_and_preprocess -d NNN -c 2d --verify_dataset_integrity``; then the medalloy
   train/val split is written as fold 0 of ``splits_final.json``, so nnU-Net validates (and picks
   nothing) on the same cases medalloy validates on.
3. budget: nnU-Net's poly learning rate must know the number of epochs up front, so a calibration
   run (``CALIBRATION_EPOCHS`` epochs of ``CALIBRATION_ITERS`` iterations, thrown away) measures
   seconds per iteration, seconds between epochs and the warm-up from nnU-Net's own training log,
   and ``plan_budget`` turns the budget into epochs x iterations per epoch. Calibration time is
   reported, not counted in the budget.
4. ``nnUNetv2_train NNN 2d 0 -tr nnUNetTrainerBudget -device cpu``; the trainer differs from
   ``nnUNetTrainer`` only in those two numbers (``benchmarks/nnunet/nnUNetTrainerBudget.py``).
5. ``nnUNetv2_predict -f 0 -tr nnUNetTrainerBudget -device cpu`` on the test images with nnU-Net's
   defaults (mirroring test-time augmentation, final checkpoint), run sequentially (``-npp 0
   -nps 0``: no worker processes on a 2-core machine).
6. the predictions are scored by experts.py's ``evaluate`` against ground truth written by its
   ``copy_ground_truth``: the same code as medalloy's row.

The 2d configuration is used for every dataset, 3D ones (ACDC, Hippocampus) included, as the
benchmark's issue asks. ``train_minutes`` runs from the start of epoch 0 to the end of the last epoch
(nnU-Net's log timestamps), like medalloy's which covers its training loop only; preprocessing,
the training command's start-up and nnU-Net's own final validation, and prediction are reported
separately. nnU-Net is not seeded, so its rows vary a little from run to run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TRAINER_DIR = HERE / "nnunet"
TRAINER = "nnUNetTrainerBudget"
PLANS = "nnUNetPlans"
CONFIGURATION = "2d"
FOLD = 0
DEFAULT_VENV = Path(os.environ.get("MEDALLOY_NNUNET_VENV", HERE.parent / "runs" / "nnunet-venv"))

# nnU-Net's default epoch length; shorter epochs only when the budget would give fewer than MIN_EPOCHS.
MAX_ITERS_PER_EPOCH = 250
MIN_EPOCHS = 10
# epoch 0 carries the warm-up; epoch 1 gives the time per iteration and the time between epochs
# (checkpoint, plot); epoch 2's start closes it
# nnU-Net's default 2d plans take 6-45 s per iteration on 2 cores (Kvasir: batch 40 of 256x256),
# so the calibration is kept short: 3 x 4 iterations (+1 validation batch each)
CALIBRATION_EPOCHS = 3
CALIBRATION_ITERS = 4
# nnU-Net dataset ids of the peer's datasets (its own nnUNet_raw, so they clash with nothing)
DATASET_IDS = {"JSRT": 502, "Shenzhen": 503, "ACDC": 504, "Hippocampus": 505, "Polyp-Kvasir": 511, "Polyp-CVC": 512}

_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?): (.*?)\s*$")
_EPOCH_START = re.compile(r"^Epoch (\d+)$")
_EPOCH_TIME = re.compile(r"^Epoch time: ([0-9.]+) s$")


def log(msg: str) -> None:
    print(f"[nnunet] {msg}", flush=True)


# -- budget ------------------------------------------------------------------------------------
def plan_budget(
    budget_seconds: float,
    seconds_per_iteration: float,
    epoch_overhead: float = 0.0,
    warmup_seconds: float = 0.0,
    max_iters: int = MAX_ITERS_PER_EPOCH,
    min_epochs: int = MIN_EPOCHS,
) -> tuple[int, int]:
    """``(iterations_per_epoch, epochs)`` whose training fits ``budget_seconds``.

    An epoch of n iterations costs n * seconds_per_iteration + epoch_overhead (checkpoint and plot
    between epochs); usable = budget - warmup. Epochs keep nnU-Net's length (max_iters) when
    floor(usable / (max_iters * s + o)) >= min_epochs. Otherwise, among min_epochs ... 2 * min_epochs
    epochs of n = floor((usable / epochs - o) / s) >= 1 iterations, the most iterations in total
    (ties: fewer epochs), so rounding n down wastes little of the budget and the poly learning rate
    still decays over several steps; when not even min_epochs epochs of one iteration fit, the
    largest epochs < min_epochs that fits; (1, 1) when nothing does.
    """
    if seconds_per_iteration <= 0 or not math.isfinite(seconds_per_iteration):
        raise ValueError(f"seconds_per_iteration must be positive, got {seconds_per_iteration}")
    usable = max(0.0, budget_seconds - max(0.0, warmup_seconds))
    overhead = max(0.0, epoch_overhead)
    full = int(usable // (max_iters * seconds_per_iteration + overhead))
    if full >= min_epochs:
        return max_iters, full

    def iters_for(epochs: int) -> int:
        return min(max_iters, int((usable / epochs - overhead) // seconds_per_iteration))

    fitting = [(iters_for(e) * e, -e) for e in range(min_epochs, 2 * min_epochs + 1) if iters_for(e) >= 1]
    if fitting:
        epochs = -max(fitting)[1]
        return iters_for(epochs), epochs
    for epochs in range(min_epochs - 1, 0, -1):
        if iters_for(epochs) >= 1:
            return iters_for(epochs), epochs
    return 1, 1


def parse_training_log(text: str) -> dict[str, Any]:
    """Epoch start and end times and epoch durations from an nnU-Net training log.

    Returns ``{"starts": [...], "ends": [...], "end": last of ends or None, "epoch_times": [s, ...]}``:
    seconds since the log's first line at each "Epoch N" line and each "Epoch time" line (the log's
    lines are ``<datetime>: <message>``; nnU-Net writes "Epoch time" when an epoch's iterations end,
    before its checkpoint and plot).
    """
    first: datetime | None = None
    starts: list[float] = []
    ends: list[float] = []
    epoch_times: list[float] = []
    for line in text.splitlines():
        m = _LOG_LINE.match(line)
        if not m:
            continue
        stamp = datetime.fromisoformat(m.group(1))
        first = first or stamp
        at = (stamp - first).total_seconds()
        if _EPOCH_START.match(m.group(2)):
            starts.append(at)
        elif t := _EPOCH_TIME.match(m.group(2)):
            epoch_times.append(float(t.group(1)))
            ends.append(at)
    return {"starts": starts, "ends": ends, "end": ends[-1] if ends else None, "epoch_times": epoch_times}


def calibration_timing(text: str, iterations: int) -> tuple[float, float, float]:
    """``(seconds_per_iteration, epoch_overhead, warmup_seconds)`` from a calibration log of >= 3 epochs.

    Epoch 1 is the steady one: per iteration = (its end - its start) / iterations (its validation
    iterations included), overhead = start of epoch 2 - end of epoch 1 (checkpoint and plot), and
    warm-up = how much longer epoch 0 took, start to start, than epoch 1.
    """
    parsed = parse_training_log(text)
    starts, ends = parsed["starts"], parsed["ends"]
    if len(starts) < 3 or len(ends) < 2:
        raise ValueError(f"calibration log has {len(starts)} epoch start(s), needs 3")
    steady = starts[2] - starts[1]
    return (ends[1] - starts[1]) / iterations, max(0.0, starts[2] - ends[1]), max(0.0, (starts[1] - starts[0]) - steady)


def training_seconds(text: str) -> float:
    """Wall-clock of the training loop: start of epoch 0 to the end of the last epoch."""
    parsed = parse_training_log(text)
    if not parsed["starts"] or parsed["end"] is None:
        raise ValueError("training log has no completed epoch")
    return parsed["end"] - parsed["starts"][0]


# -- nnU-Net raw dataset -------------------------------------------------------------------------
def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``Dataset502_JSRT``: nnU-Net's ``DatasetNNN_Name`` with the name's non-alphanumerics dropped."""
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"nnU-Net dataset ids have three digits, got {dataset_id}")
    return f"Dataset{dataset_id:03d}_{re.sub(r'[^A-Za-z0-9]', '', name)}"


def _check_split(split: dict[str, list[str]], ds_path: Path) -> None:
    from medalloy.errors import MedalloyError

    parts = {k: set(split.get(k, [])) for k in ("train", "val", "test")}
    if not parts["train"] or not parts["test"]:
        raise MedalloyError("the split needs train and test cases", ds_path, "give non-empty 'train' and 'test' lists")
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        both = parts[a] & parts[b]
        if both:
            raise MedalloyError(f"{len(both)} case(s) in both {a} and {b}, e.g. {sorted(both)[0]}", ds_path, "make the split disjoint")


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target.resolve())


def build_raw_dataset(ds_path: Path, split: dict[str, list[str]], raw_root: Path, folder_name: str) -> Path:
    """Write ``raw_root/folder_name`` (nnU-Net raw format) for a split; returns the folder.

    imagesTr/labelsTr hold the train + val cases, imagesTs the test images (symlinks named as nnU-Net
    wants: ``CASE_0000<ending>``, labels ``CASE<ending>``); dataset.json keeps the source dataset's
    channels, labels and file ending, with numTraining = train + val. The folder must not exist.
    """
    from medalloy.data.dataset import RawDataset, write_json_atomic

    _check_split(split, ds_path)
    ds = RawDataset(ds_path)
    out = raw_root / folder_name
    if out.exists():
        raise FileExistsError(f"{out} exists")
    ending = ds.spec.file_ending
    training = list(split["train"]) + list(split.get("val", []))
    for part, ids in (("Tr", training), ("Ts", list(split["test"]))):
        for cid in ids:
            case = ds.case(cid)
            for k, image in enumerate(case.images):
                _link(image, out / f"images{part}" / f"{cid}_{k:04d}{ending}")
            if part == "Tr":
                if case.label is None:
                    raise ValueError(f"{ds_path}: training case {cid} has no label")
                _link(case.label, out / "labelsTr" / f"{cid}{ending}")
    raw = json.loads((ds_path / "dataset.json").read_text(encoding="utf-8"))
    meta = {k: raw[k] for k in ("description", "reference", "licence", "release") if k in raw}
    write_json_atomic(
        out / "dataset.json",
        {
            "channel_names": dict(ds.spec.channel_names),
            "labels": dict(ds.spec.labels),
            "numTraining": len(training),
            "file_ending": ending,
            "name": folder_name.split("_", 1)[1],
            **meta,
        },
    )
    return out


def write_split(preprocessed_dataset: Path, split: dict[str, list[str]]) -> Path:
    """``splits_final.json`` with the medalloy train/val split as nnU-Net's fold 0."""
    from medalloy.data.dataset import write_json_atomic

    path = preprocessed_dataset / "splits_final.json"
    write_json_atomic(path, [{"train": sorted(split["train"]), "val": sorted(split.get("val", []))}])
    return path


# -- running nnU-Net's commands -------------------------------------------------------------------
def check_venv(venv: Path) -> Path:
    """The venv's bin folder; a one-line error with the set-up command when nnU-Net is missing."""
    from medalloy.errors import MedalloyError

    bin_dir = venv / "bin"
    missing = [c for c in ("nnUNetv2_plan_and_preprocess", "nnUNetv2_train", "nnUNetv2_predict") if not (bin_dir / c).exists()]
    if missing:
        raise MedalloyError(f"no nnU-Net v2 commands ({', '.join(missing)})", venv, f"run: bash benchmarks/nnunet/setup_venv.sh {venv}")
    return bin_dir


def nnunet_env(venv: Path, root: Path, threads: int, iters: int | None = None, epochs: int | None = None) -> dict[str, str]:
    """Environment for nnU-Net's commands: its folders under ``root``, our trainer's folder, threads."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(
        {
            "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
            "VIRTUAL_ENV": str(venv),
            "nnUNet_raw": str(root / "nnUNet_raw"),
            "nnUNet_preprocessed": str(root / "nnUNet_preprocessed"),
            "nnUNet_results": str(root / "nnUNet_results"),
            "nnUNet_extTrainer": str(TRAINER_DIR),
            "nnUNet_def_n_proc": str(threads),
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
        }
    )
    # One augmentation worker overlaps with the 2 compute threads; more would only compete on 2 cores.
    env.setdefault("nnUNet_n_proc_DA", "1")
    for key, value in (("MEDALLOY_NNUNET_ITERS", iters), ("MEDALLOY_NNUNET_EPOCHS", epochs)):
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    env.pop("MEDALLOY_NNUNET_VAL_ITERS", None)  # the trainer's default ratio, as in calibration
    return env


def run_command(cmd: list[str], env: dict[str, str], log_path: Path) -> float:
    """Run one nnU-Net command with its output in ``log_path``; returns its wall-clock seconds."""
    from medalloy.errors import MedalloyError

    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log_path.open("w", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
    seconds = time.perf_counter() - t0
    if rc != 0:
        lines = [ln for ln in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        raise MedalloyError(f"{Path(cmd[0]).name} exited with code {rc} (last line: {lines[-1] if lines else ''})", log_path, "read the log")
    return seconds


def _training_log(results_dataset: Path) -> Path:
    fold = results_dataset / f"{TRAINER}__{PLANS}__{CONFIGURATION}" / f"fold_{FOLD}"
    logs = sorted(fold.glob("training_log_*.txt"))
    if not logs:
        raise FileNotFoundError(f"{fold}: no training log")
    return logs[-1]


def _train(bin_dir: Path, env: dict[str, str], dataset_id: int, log_path: Path) -> float:
    cmd = [str(bin_dir / "nnUNetv2_train"), str(dataset_id), CONFIGURATION, str(FOLD), "-tr", TRAINER, "-device", "cpu"]
    return run_command(cmd, env, log_path)


def _model_facts(bin_dir: Path, env: dict[str, str], checkpoint: Path) -> dict[str, Any]:
    """Versions and parameter count, asked of the nnU-Net venv (its torch reads its checkpoint) by ``nnunet/facts.py``.

    The state dict names some tensors twice (a block's ``conv`` is also ``all_modules.0``; the decoder
    holds the encoder), so parameters are counted once per tensor in memory."""
    out = subprocess.run([str(bin_dir / "python"), str(TRAINER_DIR / "facts.py"), str(checkpoint)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_nnunet(
    name: str,
    ds_path: Path,
    split: dict[str, list[str]],
    budget_minutes: float,
    work: Path,
    venv: Path = DEFAULT_VENV,
    *,
    dataset_id: int | None = None,
    threads: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train nnU-Net (2d, CPU) on ``split`` within ``budget_minutes`` and score it on the test cases.

    ``split`` is experts.py's ``{"train", "val", "test"}`` case ids of the dataset at ``ds_path``;
    everything goes to ``work/nnunet`` (``overwrite`` replaces this expert's earlier peer run).
    Returns experts.py's row layout: ``{label: {"dice", "hd95"}}`` plus timings and the training
    length (see the module docstring for what each time covers).
    """
    from benchmarks.common import copy_ground_truth, evaluate
    from medalloy.data.dataset import RawDataset
    from medalloy.errors import MedalloyError

    bin_dir = check_venv(Path(venv))
    threads = threads or os.cpu_count() or 1
    dataset_id = dataset_id or DATASET_IDS.get(name, 599)
    folder = dataset_folder_name(dataset_id, name)
    root = Path(work) / "nnunet"
    raw, pre, res = (root / d / folder for d in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
    pred, gt, ev, logs, cal = (root / d / name for d in ("pred", "gt", "eval", "logs", "calibration"))
    mine = (raw, pre, res, pred, gt, ev, logs, cal)
    if any(p.exists() for p in mine):
        if not overwrite:
            raise MedalloyError(f"an earlier nnU-Net run of {name} exists", root, "pass overwrite=True (experts.py does) or use another work folder")
        for p in mine:
            shutil.rmtree(p, ignore_errors=True)

    build_raw_dataset(Path(ds_path), split, root / "nnUNet_raw", folder)
    env = nnunet_env(Path(venv), root, threads)
    log(f"{name}: plan and preprocess ({folder}, {len(split['train'])} train / {len(split.get('val', []))} val)")
    preprocess_s = run_command(
        [
            str(bin_dir / "nnUNetv2_plan_and_preprocess"),
            "-d",
            str(dataset_id),
            "-c",
            CONFIGURATION,
            "-np",
            str(threads),
            "-npfp",
            str(threads),
            "--verify_dataset_integrity",
        ],
        env,
        logs / "plan_and_preprocess.log",
    )
    write_split(pre, split)

    calibration_s = _train(bin_dir, nnunet_env(Path(venv), root, threads, CALIBRATION_ITERS, CALIBRATION_EPOCHS), dataset_id, logs / "calibration.log")
    per_iter, overhead, warmup = calibration_timing(_training_log(res).read_text(encoding="utf-8"), CALIBRATION_ITERS)
    cal.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(res), str(cal))  # kept for inspection; the real run starts from scratch
    iters, epochs = plan_budget(budget_minutes * 60.0, per_iter, overhead, warmup)
    log(f"{name}: {per_iter:.3f} s/iteration, {overhead:.1f} s between epochs, warm-up {warmup:.1f} s -> {epochs} epochs x {iters} iterations")

    train_cmd_s = _train(bin_dir, nnunet_env(Path(venv), root, threads, iters, epochs), dataset_id, logs / "train.log")
    train_log = _training_log(res)
    train_s = training_seconds(train_log.read_text(encoding="utf-8"))

    predict_s = run_command(
        [
            str(bin_dir / "nnUNetv2_predict"),
            "-i",
            str(raw / "imagesTs"),
            "-o",
            str(pred),
            "-d",
            str(dataset_id),
            "-c",
            CONFIGURATION,
            "-f",
            str(FOLD),
            "-tr",
            TRAINER,
            "-device",
            "cpu",
            "-npp",
            "0",
            "-nps",
            "0",
            "--disable_progress_bar",
        ],
        env,
        logs / "predict.log",
    )
    labels = RawDataset(ds_path).spec.labels
    fg = [k for k, v in labels.items() if v != 0]
    copy_ground_truth(Path(ds_path), list(split["test"]), gt, labels)
    row = evaluate(pred, gt, labels, ev)

    plans = json.loads((pre / f"{PLANS}.json").read_text(encoding="utf-8"))["configurations"][CONFIGURATION]
    facts = _model_facts(bin_dir, env, train_log.parent / "checkpoint_final.pth")
    n_test = len(split["test"])
    row.update(
        {
            "train_minutes": round(train_s / 60, 2),
            "budget_minutes": budget_minutes,
            "epochs": epochs,
            "iterations_per_epoch": iters,
            "iterations": epochs * iters,
            "batch_size": int(plans["batch_size"]),
            "patch_size": [int(s) for s in plans["patch_size"]],
            "images_per_second": round(epochs * iters * int(plans["batch_size"]) / max(train_s, 1e-9), 2),
            "params": int(facts["params"]),
            "seconds_per_iteration": round(per_iter, 4),
            "seconds_between_epochs": round(overhead, 2),
            "calibration_minutes": round(calibration_s / 60, 2),
            "preprocess_minutes": round(preprocess_s / 60, 2),
            "train_command_minutes": round(train_cmd_s / 60, 2),
            "inference_seconds_per_case": round(predict_s / max(1, n_test), 3),
            "test_cases": n_test,
            "mean_dice": round(sum(row[k]["dice"] for k in fg) / len(fg), 4),
            "configuration": CONFIGURATION,
            "trainer": TRAINER,
            "tta": True,
            "nnunetv2": facts["nnunetv2"],
            "torch": facts["torch"],
        }
    )
    log(f"{name}: " + ", ".join(f"{k} {row[k]['dice']:.3f}" for k in fg) + f" in {row['train_minutes']} min ({row['iterations']} iterations)")
    return row


# -- smoke check -----------------------------------------------------------------------------------
def smoke(venv: Path, work: Path, budget_minutes: float, threads: int) -> dict[str, Any]:
    """The whole chain on a small synthetic 2D dataset (plan -> train -> predict -> evaluate)."""
    from medalloy.data.dataset import RawDataset
    from medalloy.data.synth import generate_dataset

    data = work / "data"
    ds_path = data / "Dataset902_SynthCXR"
    if not ds_path.exists():
        generate_dataset("Dataset902_SynthCXR", data, cases_per_source=4, test_cases_per_source=0, progress=False)
    ids = [c.case_id for c in RawDataset(ds_path).labelled_cases()]
    split = {"train": ids[2:-1], "val": ids[-1:], "test": ids[:2]}
    return run_nnunet("SynthCXR", ds_path, split, budget_minutes, work, venv, dataset_id=902, threads=threads, overwrite=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="run the chain on a small synthetic dataset")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    p.add_argument("--work", type=Path, default=HERE.parent / "runs" / "nnunet-smoke")
    p.add_argument("--budget-minutes", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if not a.smoke:
        p.print_help()
        return 2
    row = smoke(a.venv, a.work, a.budget_minutes, a.threads or os.cpu_count() or 1)
    print(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
