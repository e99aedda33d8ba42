"""Evaluate a folder of predicted label maps against ground truth: JSON + markdown + overlay PNGs.

Files are matched by name, the nnU-Net convention (a prediction is written under its label file's
name: ``pred_dir/CASE.nii.gz`` <-> ``gt_dir/CASE.nii.gz``). Per case and foreground class it computes
Dice, HD95 and NSD (:mod:`medalloy.engine.metrics`, distances in the ground truth's spacing units)
and writes, in ``out_dir`` (default ``pred_dir/evaluation``):

- ``summary.json``: ``{"per_case", "summary", "labels", "sources", "nsd_tolerance"}``;
- ``summary.md``: mean ± std tables (all cases, then one per source when there are several);
- ``overlay_{best,median,worst}_CASE.png``: image, ground truth and prediction of the cases with
  the best, median and worst mean foreground Dice.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from medalloy.data.dataset import DEFAULT_SOURCE, RawDataset
from medalloy.data.io import READABLE_ENDINGS, file_ending, read_image, read_label
from medalloy.engine.metrics import METRICS, case_metrics, summarize
from medalloy.errors import MedalloyError
from medalloy.jsonio import atomic_path, write_text_atomic

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
_SHOW_MISSING = 5
_METRIC_TITLES = {"dice": "Dice", "hd95": "HD95", "nsd": "NSD"}
_METRIC_DIGITS = {"dice": 3, "hd95": 2, "nsd": 3}


# -- markdown ---------------------------------------------------------------------------------
def _fmt(stat: dict | None, digits: int) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    std = stat.get("std")
    if std is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {std:.{digits}f}"


def markdown_table(summary: dict, labels: list[str] | None = None) -> str:
    """A markdown table: one row per label plus a foreground ``mean`` row; Dice, HD95, NSD as mean ± std.

    ``summary`` is :func:`medalloy.engine.metrics.summarize` output, one of its ``per_source``
    entries, or a whole ``summary.json`` dict (its ``"summary"`` is used). ``labels`` selects and
    orders the rows (default: every class in the summary); a label missing from it shows ``n/a``.
    """
    if "classes" not in summary and isinstance(summary.get("summary"), dict):
        summary = summary["summary"]
    classes = summary.get("classes", {})
    if labels is None:
        labels = list(classes)
    header = "| Label | " + " | ".join(_METRIC_TITLES[m] for m in METRICS) + " |"
    rule = "|---|" + "---:|" * len(METRICS)
    rows = [header, rule]
    for name in labels:
        stats = classes.get(name, {})
        rows.append(f"| {name} | " + " | ".join(_fmt(stats.get(m), _METRIC_DIGITS[m]) for m in METRICS) + " |")
    mean = summary.get("mean", {})
    rows.append("| **mean** | " + " | ".join(_fmt(mean.get(m), _METRIC_DIGITS[m]) for m in METRICS) + " |")
    return "\n".join(rows) + "\n"


def _summary_markdown(result: dict, title: str) -> str:
    summary = result["summary"]
    names = [n for n, v in result["labels"].items() if v != 0]
    parts = [
        f"# {title}\n",
        f"{summary['n_cases']} cases; Dice, HD95 (spacing units, mm for NIfTI) and NSD (tolerance "
        f"{result['nsd_tolerance']:g}) as mean ± std over cases; `mean` averages the foreground classes per case.\n",
        markdown_table(summary, names),
    ]
    per_source = summary.get("per_source", {})
    if len(per_source) > 1:
        for src, sub in per_source.items():
            parts.append(f"## Source `{src}` (n = {sub['n_cases']})\n")
            parts.append(markdown_table(sub, names))
    return "\n".join(parts)


# -- file matching ----------------------------------------------------------------------------
def _label_files(folder: Path, ending: str | None) -> dict[str, Path]:
    """Readable label files of a folder by file name (sub-folders and hidden files ignored)."""
    files = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        end = file_ending(p)
        if (ending is not None and not p.name.endswith(ending)) or end not in READABLE_ENDINGS:
            continue
        files[p.name] = p
    return files


def _case_id(name: str) -> str:
    return name[: -len(file_ending(name))] if file_ending(name) else name


def _list_names(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOW_MISSING])
    return shown + (f", ... (+{len(names) - _SHOW_MISSING} more)" if len(names) > _SHOW_MISSING else "")


def _match(pred_dir: Path, gt_dir: Path, ending: str | None) -> list[tuple[str, Path, Path]]:
    """``(case_id, prediction, ground truth)`` for every file name present in both folders."""
    for folder, what in ((pred_dir, "prediction"), (gt_dir, "ground-truth")):
        if not folder.is_dir():
            raise MedalloyError(f"{what} folder not found", folder, "give an existing folder of label maps")
    preds = _label_files(pred_dir, ending)
    gts = _label_files(gt_dir, ending)
    if not gts:
        raise MedalloyError("no label files", gt_dir, f"put ground-truth label maps ({ending or '.png/.nii.gz'}) in it")
    missing = sorted(set(gts) - set(preds))
    if missing:
        raise MedalloyError(
            f"{len(missing)} ground-truth case(s) have no prediction: {_list_names(missing)}",
            pred_dir,
            "predict every case (same file name as its label file) or evaluate against a folder holding only the predicted cases",
        )
    extra = sorted(set(preds) - set(gts))
    if extra:
        raise MedalloyError(
            f"{len(extra)} prediction(s) have no ground truth in {gt_dir}: {_list_names(extra)}",
            pred_dir,
            "remove them or point to the matching label folder",
        )
    return [(_case_id(name), preds[name], gts[name]) for name in sorted(gts)]


# -- label maps -------------------------------------------------------------------------------
def _check_values(arr: np.ndarray, allowed: set[int], path: Path, what: str) -> None:
    bad = sorted(int(v) for v in np.unique(arr) if int(v) not in allowed)
    if bad:
        raise MedalloyError(
            f"{what} holds label value(s) {bad[:_SHOW_MISSING]} not in the label map {sorted(allowed)}",
            path,
            "fix the label map or pass the right dataset/labels",
        )


def _inferred_labels(values: set[int]) -> dict[str, int]:
    out = {"background": 0}
    out.update({f"label_{v}": v for v in sorted(values) if v != 0})
    return out


# -- overlays ---------------------------------------------------------------------------------
def _find_image(dataset: RawDataset | None, case_id: str) -> tuple[np.ndarray | None, bool]:
    """The case's image ``(C, *spatial)`` from imagesTr/ or imagesTs/ (None when not found), and
    whether it is colour: three channels read from one file (an RGB PNG/JPG), not three modalities.
    """
    if dataset is None:
        return None, False
    ending = dataset.spec.file_ending
    pattern = re.compile(re.escape(case_id) + r"_\d{4}" + re.escape(ending) + "$")
    for sub in ("imagesTr", "imagesTs"):
        folder = dataset.root / sub
        if not folder.is_dir():
            continue
        files = sorted(p for p in folder.iterdir() if pattern.match(p.name))
        if files:
            image = read_image(files)[0]
            return image, image.shape[0] == 3 and len(files) == 1
    return None, False


def _slice_index(gt: np.ndarray, pred: np.ndarray) -> int:
    """The last-axis slice with the most ground-truth foreground (else prediction, else middle)."""
    for lab in (gt, pred):
        counts = (lab != 0).reshape(-1, lab.shape[-1]).sum(axis=0)
        if counts.max() > 0:
            return int(counts.argmax())
    return gt.shape[-1] // 2


def _display_image(image: np.ndarray | None, shape: tuple[int, ...], rgb: bool) -> np.ndarray | None:
    """(H, W) grey in [0, 1] (0.5-99.5 percentile window of channel 0) or (H, W, 3) colour in [0, 1].

    None when there is no image or it does not match the label grid (overlays are a courtesy, so a
    missing or odd image only drops the image panel).
    """
    if image is None or tuple(image.shape[1:]) != tuple(shape):
        return None
    if rgb:
        colour = np.moveaxis(image, 0, -1).astype(float)
        return np.clip(colour / (255.0 if colour.max() > 1.0 else 1.0), 0.0, 1.0)
    grey = image[0].astype(float)
    lo, hi = np.percentile(grey, [0.5, 99.5])
    return np.clip((grey - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(grey)


def _label_rgba(lab: np.ndarray, values: list[int]) -> np.ndarray:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    rgba = np.zeros(lab.shape + (4,), dtype=float)
    for i, v in enumerate(values):
        rgba[lab == v] = (*cmap(i % 10)[:3], 0.45)
    return rgba


def _draw_outlines(ax: Any, lab: np.ndarray, values: list[int]) -> None:
    """Solid outlines in each label's colour, so labels stay visible over busy (e.g. RGB) images.

    ``contour`` puts ``lab[i, j]`` at ``(x=j, y=i)`` exactly as ``imshow`` does for either origin
    (origin only flips the axis), so it must not be given ``origin`` too.
    """
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    for i, v in enumerate(values):
        mask = lab == v
        if mask.any() and not mask.all():  # a constant mask has no 0.5 level to trace
            ax.contour(mask.astype(float), levels=[0.5], colors=[cmap(i % 10)], linewidths=1.0)


def _save_overlay(path: Path, image: np.ndarray | None, rgb: bool, gt: np.ndarray, pred: np.ndarray, labels: dict[str, int], title: str) -> None:
    """Panels image | ground truth | prediction (labels in colour over the image, or over black when
    there is no image); a 3D case shows the last-axis slice with the most ground-truth foreground.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if gt.ndim == 3:
        k = _slice_index(gt, pred)
        gt2, pred2 = gt[..., k].T, pred[..., k].T  # NIfTI (i, j): i to the right, j upwards (origin lower)
        img2 = image[..., k].swapaxes(1, 2) if image is not None and image.ndim == 4 else None
        origin, title = "lower", f"{title} (slice {k})"
    else:
        gt2, pred2, img2, origin = gt, pred, image, "upper"
    shown = _display_image(img2, gt2.shape, rgb)
    background = shown if shown is not None else np.zeros(gt2.shape, dtype=float)
    grey = background.ndim == 2
    values = sorted(v for v in labels.values() if v != 0)
    panels = ([("image", None)] if shown is not None else []) + [("ground truth", gt2), ("prediction", pred2)]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.9), dpi=80)
    try:
        for ax, (name, lab) in zip(np.atleast_1d(axes), panels):
            ax.imshow(background, cmap="gray" if grey else None, vmin=0.0, vmax=1.0, origin=origin, interpolation="nearest")
            if lab is not None:
                ax.imshow(_label_rgba(lab, values), origin=origin, interpolation="nearest")
                _draw_outlines(ax, lab, values)
            ax.set_title(name, fontsize=8)
            ax.axis("off")
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=80)
    finally:
        plt.close(fig)


def _ranked_cases(per_case: dict[str, dict[str, dict[str, float]]]) -> dict[str, str]:
    """best / median / worst case by mean foreground Dice (ties broken by case id)."""

    def mean_dice(cid: str) -> float:
        vals = [m["dice"] for m in per_case[cid].values()]
        return float(np.mean(vals)) if vals else 1.0

    order = sorted(per_case, key=lambda c: (mean_dice(c), c))
    return {"best": order[-1], "median": order[(len(order) - 1) // 2], "worst": order[0]}


# -- main entry -------------------------------------------------------------------------------
def _refuse_overwrite(out: Path, overwrite: bool) -> None:
    """Checked before any work, so a refused run costs nothing; the folder is created on write."""
    if overwrite or not out.is_dir():
        return
    existing = [out / n for n in (SUMMARY_JSON, SUMMARY_MD) if (out / n).exists()] + sorted(out.glob("overlay_*.png"))
    if existing:
        raise MedalloyError("evaluation results already exist", existing[0], "pass overwrite=True (--overwrite) or choose another output folder")


def _jsonable(obj: Any) -> Any:
    """Plain Python floats, with non-finite numbers as None so the file stays valid JSON."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def evaluate_folders(
    pred_dir: str | Path,
    gt_dir: str | Path,
    dataset: str | Path | None = None,
    out_dir: str | Path | None = None,
    labels: dict[str, int] | None = None,
    nsd_tolerance: float = 1.0,
    overlays: bool = True,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Evaluate predictions against ground truth and write summary.json, summary.md and overlays.

    ``dataset`` (an nnU-Net raw dataset folder) supplies the label map, each case's source and the
    images for the overlays; ``labels`` (name -> value), when given, takes precedence for the label
    map; with neither, labels are inferred from the values present (``"label_<v>"``, 0 being
    ``"background"``). A value outside a given label map is an error. Classes absent from both prediction and
    ground truth of a case score as "both empty" (Dice 1, HD95 0, NSD 1). Spacing is taken from the
    ground truth. Returns the dict written to ``summary.json``.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    ds = RawDataset(dataset) if dataset is not None else None
    if ds is not None and labels is None:
        labels = dict(ds.spec.labels)
    out = Path(out_dir) if out_dir is not None else pred_dir / "evaluation"
    _refuse_overwrite(out, overwrite)
    pairs = _match(pred_dir, gt_dir, ds.spec.file_ending if ds is not None else None)

    from tqdm import tqdm

    allowed = set(labels.values()) | {0} if labels is not None else None  # background is always allowed
    per_case: dict[str, dict[str, dict[str, float]]] = {}
    seen: set[int] = set()
    for cid, p_path, g_path in tqdm(pairs, desc="evaluate", unit="case", disable=not progress):
        gt, gmeta = read_label(g_path)
        pred, _ = read_label(p_path)
        if pred.shape != gt.shape:
            raise MedalloyError(
                f"prediction shape {tuple(pred.shape)} differs from ground-truth shape {tuple(gt.shape)}", p_path, "predict on the ground truth's grid"
            )
        if allowed is not None:
            _check_values(gt, allowed, g_path, "ground truth")
            _check_values(pred, allowed, p_path, "prediction")
            case_labels = labels
        else:
            present = {int(v) for v in np.union1d(np.unique(gt), np.unique(pred))}
            seen |= present
            case_labels = _inferred_labels(present)
        per_case[cid] = case_metrics(pred, gt, case_labels, gmeta.spacing, nsd_tolerance)

    if labels is None:
        labels = _inferred_labels(seen)
        # a class a case never contains in either map is "both empty" by the metrics' convention
        for cid in per_case:
            per_case[cid] = {n: per_case[cid].get(n, {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}) for n, v in labels.items() if v != 0}

    extras = ds.case_extras if ds is not None else {}
    sources = {cid: str(extras.get(cid, {}).get("source", DEFAULT_SOURCE)) for cid in per_case}
    result = _jsonable(
        {
            "per_case": per_case,
            "summary": summarize(per_case, sources),
            "labels": labels,
            "sources": sources,
            "nsd_tolerance": float(nsd_tolerance),
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:  # overlays of an earlier run may name other cases; drop them so the folder is consistent
        for old in out.glob("overlay_*.png"):
            old.unlink()
    write_text_atomic(out / SUMMARY_JSON, json.dumps(result, indent=2, allow_nan=False) + "\n")
    title = f"Evaluation of {pred_dir.name}" + (f" on {ds.name}" if ds is not None else "")
    write_text_atomic(out / SUMMARY_MD, _summary_markdown(result, title))
    if overlays:
        _write_overlays(out, per_case, {cid: (p, g) for cid, p, g in pairs}, ds, labels)
    return result


def _write_overlays(
    out: Path,
    per_case: dict[str, dict[str, dict[str, float]]],
    files: dict[str, tuple[Path, Path]],
    ds: RawDataset | None,
    labels: dict[str, int],
) -> None:
    """overlay_{best,median,worst}_CASE.png by mean foreground Dice (re-reading just those cases)."""
    for kind, cid in _ranked_cases(per_case).items():
        pred, _ = read_label(files[cid][0])
        gt, _ = read_label(files[cid][1])
        dice = float(np.mean([m["dice"] for m in per_case[cid].values()])) if per_case[cid] else 1.0
        image, rgb = _find_image(ds, cid)
        _save_overlay(out / f"overlay_{kind}_{cid}.png", image, rgb, gt, pred, labels, f"{kind}: {cid}  Dice {dice:.3f}")
