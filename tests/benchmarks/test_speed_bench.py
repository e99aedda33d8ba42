"""benchmarks/speed.py and nnunet_agreement.py render their results from the JSON alone; speed's markdown
points to the notes people write (results/speed/NOTES.md) and holds none of their text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import nnunet_agreement, speed


def _speed_result(bf16_speed: bool) -> dict:
    train = {"steps": 200, "images_per_s": 6.24, "dice": {"lung": 0.95}, "train_peak_rss_mib": 807.0}
    infer = {"dataset": "JSRT", "patch_size": [224, 224], "seconds_per_case": {"fp32": 0.0569, "bf16": 0.0359}, "peak_rss_mib": 460.0}
    return {
        "cpu": "AMD EPYC", "threads": 2, "torch": "2.13.0+cpu", "bf16_units": "avx512_bf16",
        "engine_overhead": {"engine_images_per_s": 11.03, "bare_images_per_s": 10.39, "ratio": 1.062, "batch_size": 3, "patch_size": [224, 224]},
        "data_loading": {"workers": 0, "data_fraction": 0.055},
        "bf16_vs_fp32": {"fp32": train, "bf16": {**train, "images_per_s": 10.89}, "speed_ratio": 1.745, "dice_difference": 0.0007},
        "inference_2d": infer,
        "inference_3d": {**infer, "dataset": "Hippocampus", "patch_size": [40, 56, 40], "seconds_per_case": {"fp32": 0.1528, "bf16": 0.0439}},
        "targets": {"engine_ratio": True, "data_fraction": True, "bf16_speed": bf16_speed, "bf16_dice": True, "train_memory": True},
        "defaults": {"train_precision": "bf16", "inference": "fastest measured 2D setting: bf16"},
    }  # fmt: skip


@pytest.mark.parametrize("bf16_speed", [False, True])
def test_speed_markdown_points_to_the_notes_and_holds_none_of_their_text(bf16_speed: bool) -> None:
    md = speed.markdown(_speed_result(bf16_speed))
    lines = md.splitlines()
    assert lines[-1] == "Notes (written by people, not generated): [NOTES.md](NOTES.md)."
    assert "| bf16 vs fp32 training speed | 1.75x | >= 1.8x | " + ("met" if bf16_speed else "**missed**") + " |" in lines
    assert "bf16 matrix units this CPU reports in /proc/cpuinfo: avx512_bf16." in lines
    notes = (Path(speed.__file__).parent / "results" / "speed" / "NOTES.md").read_text(encoding="utf-8")
    assert "not AMX tiles" in notes and "not AMX tiles" not in md
    assert speed.RESULTS == Path(speed.__file__).parent / "results" / "speed"


def test_agreement_report_renders_results_md_from_results_json(tmp_path: Path) -> None:
    res = {
        "dataset": "JSRT", "budget_minutes": 6.0, "nnunetv2": "2.8.1", "nnunet_iterations": 48, "nnunet_train_minutes": 5.58,
        "test_cases": 50, "pixel_agreement": 0.99917,
        "agreement_dice": {"lung": 0.9983, "heart": 0.9676}, "medalloy_dice": {"lung": 0.756, "heart": 0.003}, "nnunet_dice": {"lung": 0.757, "heart": 0.003},
    }  # fmt: skip
    (tmp_path / "results.json").write_text(json.dumps(res), encoding="utf-8")
    assert nnunet_agreement.main(["--results", str(tmp_path), "--report"]) == 0
    lines = (tmp_path / "results.md").read_text(encoding="utf-8").splitlines()
    assert "| lung | 0.9983 | 0.756 | 0.757 | met (>= 0.99) |" in lines
    assert nnunet_agreement.RESULTS == Path(nnunet_agreement.__file__).parent / "results" / "nnunet_agreement"
