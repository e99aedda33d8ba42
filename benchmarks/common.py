"""Scoring helpers shared by the benchmark scripts (no benchmark imports another benchmark's
shared parts: they live here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def copy_ground_truth(ds_path: Path, case_ids: list[str], out: Path, keep: dict[str, int]) -> None:
    """Held-out labels, with values outside ``keep`` set to background (for cross-label rows)."""
    from medalloy.data.dataset import RawDataset
    from medalloy.data.io import read_label, write_label

    ds = RawDataset(ds_path)
    out.mkdir(parents=True, exist_ok=True)
    for cid in case_ids:
        label, meta = read_label(ds.case(cid).label)
        label = np.where(np.isin(label, list(keep.values())), label, 0)
        write_label(out / f"{cid}{ds.spec.file_ending}", label, meta)


def evaluate(pred: Path, gt: Path, labels: dict[str, int], out: Path) -> dict[str, Any]:
    from medalloy.evaluation import evaluate_folders

    res = evaluate_folders(pred, gt, labels=labels, out_dir=out, overwrite=True, progress=False)
    row = {}
    for name, stats in res["summary"]["classes"].items():
        row[name] = {"dice": round(stats["dice"]["mean"], 4), "hd95": round(stats["hd95"]["mean"], 3)}
    return row
