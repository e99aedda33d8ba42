"""Segmentation metrics per class and per case (MONAI implementations), plus summaries over cases;
and the image-report metrics: image <-> text retrieval Recall@k (pretraining's validation and its
downstream command), balanced accuracy (zero-shot and linear probes) and caption BLEU-4 / ROUGE-L
(by sacrebleu and rouge-score: the packages papers use, not our own).

Metrics, for one foreground class with prediction mask ``P`` and ground-truth mask ``G``:

- **Dice** ``= 2|P ∩ G| / (|P| + |G|)`` (MONAI ``compute_dice``);
- **HD95**: the 95th percentile of the symmetric surface distances between the boundaries of ``P``
  and ``G`` (MONAI ``compute_hausdorff_distance(percentile=95)``), in spacing units (mm for NIfTI);
- **NSD** (normalised surface Dice): the fraction of both boundaries lying within ``nsd_tolerance``
  of the other boundary (MONAI ``compute_surface_dice``), in ``[0, 1]``.

Empty masks (MONAI returns NaN distances for these; medalloy fixes the value so that means over
cases stay defined, as the Medical Segmentation Decathlon and nnU-Net-style reports do):

====================  ======  ===============================  ======
case                  Dice    HD95                             NSD
====================  ======  ===============================  ======
both empty            1.0     0.0                              1.0
exactly one empty     0.0     image diagonal (worst case, mm)  0.0
====================  ======  ===============================  ======

where the image diagonal is ``sqrt(sum_i (shape_i * spacing_i)^2)``, an upper bound of any distance
inside the image.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from medalloy.data.dataset import DEFAULT_SOURCE
from medalloy.errors import MedalloyError

METRICS = ("dice", "hd95", "nsd")


# -- per case ---------------------------------------------------------------------------------
def image_diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Physical length of the image diagonal: ``sqrt(sum_i (shape_i * spacing_i)^2)``."""
    return float(math.sqrt(sum((float(n) * float(s)) ** 2 for n, s in zip(shape, spacing))))


def _check_spacing(shape: tuple[int, ...], spacing: Sequence[float] | None) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * len(shape)
    spacing = tuple(float(s) for s in spacing)  # MONAI rejects mixed int/float sequences
    if len(spacing) != len(shape):
        raise MedalloyError(
            f"spacing {spacing} has {len(spacing)} entries for a {len(shape)}D label map",
            fix="give one spacing per spatial axis",
        )
    if any(not math.isfinite(s) or s <= 0 for s in spacing):
        raise MedalloyError(f"spacing {spacing} must be positive", fix="fix the image header's voxel size")
    return spacing


def _monai_binary_metrics(p: np.ndarray, g: np.ndarray, spacing: tuple[float, ...], tol: float) -> dict[str, float]:
    """Dice, HD95 and NSD of two non-empty boolean masks via MONAI on ``(1, 1, *spatial)`` tensors.

    One class at a time keeps memory at two masks, whatever the number of classes.
    """
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

    pt = torch.from_numpy(np.ascontiguousarray(p))[None, None]
    gt = torch.from_numpy(np.ascontiguousarray(g))[None, None]
    with warnings.catch_warnings():
        # MONAI 1.5+ emits a deprecation warning from inside its own edge extraction on every call.
        warnings.simplefilter("ignore", FutureWarning)
        dice = compute_dice(pt.float(), gt.float(), include_background=True, ignore_empty=False)
        hd95 = compute_hausdorff_distance(pt, gt, include_background=True, percentile=95, spacing=list(spacing))
        nsd = compute_surface_dice(pt, gt, class_thresholds=[float(tol)], include_background=True, spacing=list(spacing))
    return {"dice": float(dice.item()), "hd95": float(hd95.item()), "nsd": float(nsd.item())}


def binary_metrics(p: np.ndarray, g: np.ndarray, spacing: Sequence[float] | None = None, nsd_tolerance: float = 1.0) -> dict[str, float]:
    """Dice, HD95 and NSD of one boolean prediction mask against one ground-truth mask (any dims).

    Empty masks follow the module conventions (both empty: 1/0/1; one empty: 0/diagonal/0).
    """
    p = np.asarray(p, dtype=bool)
    g = np.asarray(g, dtype=bool)
    spacing_t = _check_spacing(g.shape, spacing)
    p_any, g_any = bool(p.any()), bool(g.any())
    if not p_any and not g_any:
        return {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}
    if p_any != g_any:
        return {"dice": 0.0, "hd95": image_diagonal(g.shape, spacing_t), "nsd": 0.0}
    return _monai_binary_metrics(p, g, spacing_t, nsd_tolerance)


def case_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    labels: dict[str, int],
    spacing: Sequence[float] | None = None,
    nsd_tolerance: float = 1.0,
) -> dict[str, dict[str, float]]:
    """Per foreground class metrics of one case: ``{name: {"dice", "hd95", "nsd"}}``.

    ``pred`` and ``gt`` are integer label maps of equal shape ``(*spatial)`` (2D or 3D); ``labels``
    maps names to values (value 0, the background, is skipped); ``spacing`` has one entry per axis
    (default 1.0) and sets the unit of HD95 and of ``nsd_tolerance``. Empty-mask conventions: see
    the module docstring (both empty -> 1.0 / 0.0 / 1.0; exactly one empty -> 0.0 / diagonal / 0.0).
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise MedalloyError(
            f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}",
            fix="predict on the ground truth's grid",
        )
    if nsd_tolerance < 0:
        raise MedalloyError(f"nsd_tolerance {nsd_tolerance} is negative", fix="give a tolerance >= 0 in spacing units")
    spacing_t = _check_spacing(gt.shape, spacing)
    out: dict[str, dict[str, float]] = {}
    for name, value in labels.items():
        if value == 0:
            continue
        out[name] = binary_metrics(pred == value, gt == value, spacing_t, nsd_tolerance)
    return out


# -- training-time Dice -----------------------------------------------------------------------
def batch_dice(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per foreground class Dice over a whole batch, shape ``(num_classes - 1,)``, float32.

    ``pred`` and ``target`` are label maps ``(B, *spatial)``; ``pred`` may also be scores
    ``(B, num_classes, *spatial)`` (argmax taken) and ``target`` may carry MONAI's channel axis
    ``(B, 1, *spatial)``. Voxels of all batch items are pooled: ``Dice_c = 2 TP_c / (|P_c| + |G_c|)``
    from one confusion matrix; a class absent from both gives 1.0. No distances, so cheap enough
    for every validation step.
    """
    if num_classes < 2:
        raise MedalloyError(f"num_classes={num_classes}", fix="give at least 2 classes (background + one foreground)")
    if pred.ndim == target.ndim + 1 or (pred.ndim == target.ndim and pred.ndim > 2 and pred.shape[1] == num_classes and target.shape[1] == 1):
        pred = pred.argmax(dim=1)
    if target.ndim == pred.ndim + 1 and target.shape[1] == 1:
        target = target[:, 0]
    if pred.shape != target.shape:
        raise MedalloyError(
            f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}",
            fix="pass label maps (B, *spatial) of equal shape",
        )
    p = pred.reshape(-1).long()
    t = target.reshape(-1).long().to(p.device)  # a GPU prediction against labels read on the host
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= num_classes or int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise MedalloyError(
            f"label values outside [0, {num_classes - 1}]",
            fix="check num_classes against the dataset's labels",
        )
    # confusion[i, j] = number of voxels predicted i whose truth is j
    confusion = torch.bincount(p * num_classes + t, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    confusion = confusion.double()
    tp = confusion.diagonal()
    denom = confusion.sum(dim=1) + confusion.sum(dim=0)
    dice = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.ones_like(denom))
    return dice[1:].float()


# -- summaries --------------------------------------------------------------------------------
def _stats(values: list[float]) -> dict[str, float | int | None]:
    """Mean, population std (ddof=0, so one case gives 0 not NaN) and n of the finite values."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if arr.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std()), "n": int(arr.size)}


def _summarize_group(per_case: dict[str, dict[str, dict[str, float]]], cases: list[str]) -> dict:
    classes: list[str] = []
    for cid in cases:
        for name in per_case[cid]:
            if name not in classes:
                classes.append(name)
    out: dict = {"n_cases": len(cases), "classes": {}, "mean": {}}
    for name in classes:
        out["classes"][name] = {m: _stats([per_case[c][name][m] for c in cases if name in per_case[c] and m in per_case[c][name]]) for m in METRICS}
    for m in METRICS:
        case_means = []
        for c in cases:
            vals = [v[m] for v in per_case[c].values() if m in v and v[m] is not None and math.isfinite(v[m])]
            if vals:
                case_means.append(float(np.mean(vals)))
        out["mean"][m] = _stats(case_means)
    return out


def summarize(per_case: dict[str, dict[str, dict[str, float]]], sources: dict[str, str] | None = None) -> dict:
    """Mean, std and n per class and metric over cases, overall and per source.

    ``per_case`` is ``{case: {class: {"dice", "hd95", "nsd"}}}`` (as from :func:`case_metrics`).
    Returns::

        {"n_cases": N,
         "classes": {class: {metric: {"mean", "std", "n"}}},
         "mean": {metric: {"mean", "std", "n"}},          # over cases of each case's class-mean
         "per_source": {source: {"n_cases", "classes", "mean"}}}   # only when sources given

    The foreground ``"mean"`` first averages the classes within a case, then takes mean/std over
    cases (so its mean equals the mean of the class means when every case has every class).
    std is the population std (ddof=0); NaN/inf values are left out and not counted in n. Cases
    missing from ``sources`` count as source ``"default"``.
    """
    cases = sorted(per_case)
    out = _summarize_group(per_case, cases)
    if sources is not None:
        groups: dict[str, list[str]] = {}
        for c in cases:
            groups.setdefault(str(sources.get(c, DEFAULT_SOURCE)), []).append(c)
        out["per_source"] = {src: _summarize_group(per_case, groups[src]) for src in sorted(groups)}
    return out


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, keys: Sequence[str] | None = None, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image -> text Recall@k: the share of images whose own report is among the ``k`` most similar
    texts. With ``keys`` (the texts, normalised), a report identical to the image's own counts as
    its own (many impressions are the same sentence)."""
    sims = torch.nn.functional.normalize(image_emb, dim=-1) @ torch.nn.functional.normalize(text_emb, dim=-1).t()
    n = sims.shape[0]
    keys_arr = np.asarray(keys if keys is not None else np.arange(n))
    order = sims.argsort(dim=1, descending=True).numpy()
    hits = keys_arr[order] == keys_arr[:, None]
    return {f"r{k}": float(hits[:, : min(k, sims.shape[1])].any(1).mean()) for k in ks}


def balanced_accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean over the true classes of the share predicted right (chance: 1 / classes, whatever the mix)."""
    return float(np.mean([np.mean(pred[truth == c] == c) for c in np.unique(truth)]))


def caption_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-4 (sacrebleu, 0-100 scaled to 0-1) and mean ROUGE-L F1 (rouge-score)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(predictions) != len(references) or not predictions:
        raise ValueError("give one reference per prediction")
    bleu = sacrebleu.corpus_bleu(list(predictions), [list(references)]).score / 100.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = float(np.mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]))
    return {"bleu4": float(bleu), "rougeL": rouge}
