"""Plan a dataset: a simplified nnU-Net recipe tuned for training on a few CPU cores.

Every choice is made from the dataset fingerprint (:mod:`medalloy.planning.fingerprint`) by the
rules below, and is explained in ``Plan.notes``.

1. **Dimension.** 2D images give a 2D plan. 3D volumes are trained slice by slice (2D, with
   ``slice_axis`` = the coarse axis) when they are strongly anisotropic: the median spacing ratio
   ``max/min > 3`` (slice axis = coarsest spacing), *or* one axis' median size is below 1/4 of the
   largest axis' median size (slice axis = that short axis; this catches headers that claim 1 mm
   for thick slices, e.g. ACDC: ~9 slices of 216x256 px). Otherwise 3D. ``force_dim`` overrides;
   a forced 2D plan on 3D data slices along the coarsest spacing (then the fewest voxels).
2. **Target spacing.** The median spacing of the in-network axes. 2D: when the median resampled
   image side exceeds ``max_2d_side``, all in-plane spacings are multiplied by
   ``side / max_2d_side`` so the median image fits (Shenzhen 512 px at 1 mm -> 2 mm, 256 px).
   3D: when the median resampled volume exceeds ``8 * max_3d_voxels`` (a patch would cover less
   than half of each axis), the finer axes are coarsened in 5 % steps, never beyond the coarsest
   axis (all axes together once isotropic), until it fits.
3. **Patch.** The median resampled shape (per case ``shape * spacing / target``, median per axis,
   rounded). 2D: with ``max_2d_patch`` each axis is capped at that size, so larger images are
   trained on random (foreground-oversampled) crops at full resolution and predicted by sliding
   window (cheaper steps without the detail lost by coarser spacing; but less context per patch,
   which changes how an expert fares on other sources, either way: a Shenzhen expert planned with
   128 px crops labelled the dark border of a third source's X-rays as lung, 0.71 Dice vs 0.90
   whole-image, yet scored 0.81 vs 0.20 on JSRT, and JSRT's 0.66 vs 0.76 on Shenzhen; the experts
   benchmark's `-crop128` cross rows, docs/research/hermes.md "Field of view"). 3D: while the padded patch exceeds ``max_3d_voxels`` the largest axis is shrunk by
   its divisibility step. Each axis is finally rounded *up* to a multiple of ``2**pools`` on that
   axis (smaller images are padded, as nnU-Net does).
4. **Network** (MONAI DynUNet). Stage 0 has stride 1. Each further stage has stride 2 on every
   axis whose current feature size is ``>= 8`` (so the bottleneck is ``>= 4``), stride 1 on the
   others; at most ``MAX_POOLINGS`` = 5 downsampling stages. Kernel 3 on every axis, except in 3D
   (as nnU-Net): an axis whose current spacing is more than 2x the finest spacing (among axes
   still large enough to pool) gets kernel 1 *and is not pooled*, so the ratio halves each time
   the other axes are pooled until the axis joins. ``filters[i] = min(base_filters * 2**i,
   max_filters)``.
5. **Batch.** 2D: ``batch_2d`` or ``round(12 * 224 * 224 / 4 / prod(patch))`` clamped to
   ``[2, 32]`` (a CPU-sized number of pixels per step); 3D: 2.
6. **Normalisation** per channel: RGB datasets -> ``rgb``; a channel named CT (the word ``CT``
   in any case, or an upper-case word ending in CT such as ``CECT``; so "spectral" is not CT) ->
   ``ct`` with the foreground percentiles 0.5/99.5 as clip range and the foreground mean/std;
   anything else -> per-image ``zscore``.
7. **Labels.** ``label_values`` = sorted declared label values (0 always included); a value found
   in the label maps but not declared in ``dataset.json`` is an error.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from medalloy.data.dataset import RawDataset
from medalloy.errors import MedalloyError
from medalloy.planning.fingerprint import fingerprint, save_fingerprint
from medalloy.planning.plan import ChannelNorm, NetworkPlan, Plan, save_plan

MAX_POOLINGS = 5
MIN_POOL_SIZE = 8  # an axis is halved only while its feature size is at least this
ANISOTROPY_SPACING_RATIO = 3.0
ANISOTROPY_SIZE_RATIO = 4.0
KERNEL1_SPACING_RATIO = 2.0
BATCH_2D_PIXELS = 12 * 224 * 224 / 4
BATCH_3D = 2
VOLUME_SLACK_3D = 8  # coarsen 3D spacing only when the median volume exceeds this many patch budgets
FINGERPRINT_NAME = "fingerprint.json"
_FP_KEYS = ("dataset", "dim", "shapes", "spacings", "median_shape", "median_spacing", "intensity", "rgb", "label_values_found")


# -- helpers -----------------------------------------------------------------------------------
def _fmt(values: Any) -> str:
    """``[1.0, 2.5]`` -> ``1x2.5`` for notes."""
    return "x".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def is_ct_channel(name: str) -> bool:
    """True for a CT channel name: the word "CT" in any case, or an upper-case word ending in "CT"."""
    for word in re.split(r"[^A-Za-z0-9]+", name):
        if word.upper() == "CT" or (word.isupper() and word.endswith("CT")):
            return True
    return False


def _check_settings(
    max_2d_side: int, max_3d_voxels: int, base_filters: int, max_filters: int, batch_2d: int | None, force_dim: int | None, max_2d_patch: int | None = None
) -> None:
    checks = [
        (max_2d_side >= MIN_POOL_SIZE, f"max_2d_side must be >= {MIN_POOL_SIZE} (got {max_2d_side})"),
        (max_2d_patch is None or max_2d_patch >= MIN_PATCH, f"max_2d_patch must be >= {MIN_PATCH} (got {max_2d_patch})"),
        (max_3d_voxels >= 4**3, f"max_3d_voxels must be >= 64 (got {max_3d_voxels})"),
        (base_filters >= 1 and max_filters >= base_filters, f"need 1 <= base_filters <= max_filters (got {base_filters}, {max_filters})"),
        (batch_2d is None or batch_2d >= 1, f"batch_2d must be >= 1 (got {batch_2d})"),
        (force_dim in (None, 2, 3), f"force_dim must be 2, 3 or None (got {force_dim})"),
    ]
    for ok, message in checks:
        if not ok:
            raise MedalloyError(message, fix="change the planning setting")


def _check_fingerprint(fp: dict, dataset: RawDataset) -> None:
    missing = [k for k in _FP_KEYS if k not in fp]
    if missing:
        raise MedalloyError(f"fingerprint lacks {', '.join(missing)}", dataset.root, "make a new fingerprint with medalloy.planning.fingerprint.fingerprint()")
    if fp["dataset"] != dataset.name:
        raise MedalloyError(f"fingerprint is of dataset '{fp['dataset']}', not '{dataset.name}'", dataset.root, "fingerprint this dataset")


# -- 1. dimension ------------------------------------------------------------------------------
def choose_dim(median_shape: list[float], median_spacing: list[float], force_dim: int | None = None) -> tuple[int, int | None, str]:
    """``(dim, slice_axis, reason)`` for data with the given median shape/spacing (rule 1)."""
    nd = len(median_shape)
    if nd == 2:
        if force_dim == 3:
            raise MedalloyError("cannot make a 3D plan for 2D images", fix="drop force_dim=3 (--dim 3)")
        return 2, None, "2D images: 2D network"
    sp, sh = np.asarray(median_spacing, float), np.asarray(median_shape, float)
    ratio = float(sp.max() / sp.min())
    if ratio > ANISOTROPY_SPACING_RATIO:
        axis = int(np.argmax(sp))
        reason = f"2D per slice along axis {axis}: spacing ratio {ratio:.2g} > {ANISOTROPY_SPACING_RATIO:g} ({_fmt(median_spacing)} mm)"
    elif sh.min() < sh.max() / ANISOTROPY_SIZE_RATIO:
        axis = int(np.argmin(sh))
        in_plane = [f"{sh[a]:g}" for a in range(nd) if a != axis]
        reason = (
            f"2D per slice along axis {axis}: {sh[axis]:g} slices vs {'x'.join(in_plane)} px in-plane "
            f"(fewer than 1/{ANISOTROPY_SIZE_RATIO:g} of the largest axis, whatever the header spacing says)"
        )
    else:
        axis = None
        reason = f"3D network: spacing ratio {ratio:.2g} <= {ANISOTROPY_SPACING_RATIO:g} and no axis is short ({_fmt(median_shape)} voxels)"
    if force_dim == 3:
        return 3, None, f"3D network (forced; the automatic choice was: {reason})"
    if force_dim == 2 and axis is None:
        # Coarsest spacing first, then fewest voxels, then the last axis (NIfTI slices along k).
        axis = max(range(nd), key=lambda a: (sp[a], -sh[a], a))
        return 2, axis, f"2D per slice along axis {axis} (forced; coarsest spacing, then fewest voxels)"
    if axis is None:
        return 3, None, reason
    return 2, axis, reason + (" (forced)" if force_dim == 2 else "")


# -- 2./3. spacing and patch -------------------------------------------------------------------
def resampled_median(shapes: list[list[int]], spacings: list[list[float]], axes: list[int], target: list[float]) -> np.ndarray:
    """Per-axis median over cases of ``shape * spacing / target`` (float), for the given array axes."""
    sh = np.asarray(shapes, float)[:, axes]
    sp = np.asarray(spacings, float)[:, axes]
    return np.median(sh * sp / np.asarray(target, float), axis=0)


def target_spacing_2d(median: np.ndarray, spacing: list[float], max_side: int) -> tuple[list[float], str]:
    """Median spacing, scaled up uniformly when the median image side exceeds ``max_side`` (rule 2)."""
    side = float(median.max())
    if side <= max_side:
        return list(
            spacing
        ), f"target spacing {_fmt(spacing)}: median spacing (median image {_fmt(np.rint(median).astype(int).tolist())} fits max_2d_side={max_side})"
    factor = side / max_side
    target = [float(s * factor) for s in spacing]
    return target, (
        f"target spacing {_fmt([round(t, 4) for t in target])}: median spacing {_fmt(spacing)} coarsened x{factor:.3g} "
        f"so the median image ({_fmt(np.rint(median).astype(int).tolist())} px) fits max_2d_side={max_side}"
    )


def target_spacing_3d(shapes: list[list[int]], spacings: list[list[float]], spacing: list[float], max_voxels: int) -> tuple[list[float], str]:
    """Median spacing, coarsened (finer axes first) while the median volume exceeds 8 budgets (rule 2)."""
    axes = list(range(len(spacing)))
    limit = VOLUME_SLACK_3D * max_voxels
    sp = np.asarray(spacing, float)
    if np.prod(resampled_median(shapes, spacings, axes, sp.tolist())) <= limit:
        return list(spacing), f"target spacing {_fmt(spacing)}: median spacing"
    while np.prod(resampled_median(shapes, spacings, axes, sp.tolist())) > limit:
        coarsest = sp.max()
        finer = sp < coarsest * (1 - 1e-9)
        if finer.any():
            sp[finer] = np.minimum(sp[finer] * 1.05, coarsest)
        else:
            sp = sp * 1.05
    target = [float(round(s, 6)) for s in sp]
    return (
        target,
        f"target spacing {_fmt(target)}: median spacing {_fmt(spacing)} coarsened so the median volume is <= {VOLUME_SLACK_3D} x max_3d_voxels={max_voxels}",
    )


def _kernel(spacing: np.ndarray, reference: float, dim: int) -> list[int]:
    if dim == 2:
        return [3, 3]
    return [1 if s > KERNEL1_SPACING_RATIO * reference else 3 for s in spacing]


def _reference_spacing(spacing: np.ndarray, sizes: np.ndarray) -> float:
    """Finest spacing among the axes still large enough to pool (all axes when none is)."""
    poolable = sizes >= MIN_POOL_SIZE
    return float(spacing[poolable].min() if poolable.any() else spacing.min())


MIN_STAGES = 3  # input block, one downsampling, bottleneck: the smallest DynUNet
MIN_PATCH = 16  # per axis: room for two poolings down to the minimum feature size


def topology(patch: list[int], spacing: list[float], dim: int) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """DynUNet ``(kernels, strides, pools_per_axis)`` for a patch at a spacing (rule 4).

    Stage ``i`` has ``strides[i]`` and then works at the resolution reached, where ``kernels[i]``
    is chosen. Feature sizes are tracked as floats (``size / 2**pools``).
    """
    sizes = np.asarray(patch, float)
    sp = np.asarray(spacing, float)
    kernels = [_kernel(sp, _reference_spacing(sp, sizes), dim)]
    strides = [[1] * dim]
    pools = np.zeros(dim, int)
    for _ in range(MAX_POOLINGS):
        pool = sizes >= MIN_POOL_SIZE
        if dim == 3:
            pool &= sp <= KERNEL1_SPACING_RATIO * _reference_spacing(sp, sizes) * (1 + 1e-9)
        if not pool.any():
            break
        stride = np.where(pool, 2, 1)
        sizes, sp, pools = sizes / stride, sp * stride, pools + pool
        strides.append(stride.tolist())
        kernels.append(_kernel(sp, _reference_spacing(sp, sizes), dim))
    return kernels, strides, pools.tolist()


def _pad_to_pools(patch: list[int], pools: list[int]) -> list[int]:
    return [int(math.ceil(p / 2**k) * 2**k) for p, k in zip(patch, pools)]


def patch_and_topology(
    median: np.ndarray, spacing: list[float], dim: int, max_voxels: int | None, max_side: int | None = None
) -> tuple[list[int], list[list[int]], list[list[int]]]:
    """Patch (rule 3) and its network layout; ``max_voxels`` caps the patch's voxel count and
    ``max_side`` each of its axes (None: no cap).

    A DynUNet needs at least two poolings, so a patch is never shrunk below that, and a tiny one
    is padded up to ``MIN_PATCH`` per axis (the network pads the image, as nnU-Net does)."""
    patch = [max(1, int(round(m))) for m in median]
    if max_side is not None:
        patch = [min(p, max_side) for p in patch]
    kernels, strides, pools = topology(patch, spacing, dim)
    if len(strides) < MIN_STAGES:
        patch = [max(p, MIN_PATCH) for p in patch]
    while True:
        kernels, strides, pools = topology(patch, spacing, dim)
        padded = _pad_to_pools(patch, pools)
        if max_voxels is None or int(np.prod(padded)) <= max_voxels:
            return padded, kernels, strides
        axis = int(np.argmax(padded))
        smaller = list(padded)
        smaller[axis] = max(1, smaller[axis] - 2 ** pools[axis])
        if len(topology(smaller, spacing, dim)[1]) < MIN_STAGES:
            return padded, kernels, strides  # the budget cannot be met by a valid network
        patch = smaller


# -- 5./6./7. batch, normalisation, labels -----------------------------------------------------
def batch_size_2d(patch: list[int]) -> int:
    """``round(12 * 224 * 224 / 4 / prod(patch))`` clamped to [2, 32]."""
    return int(min(32, max(2, round(BATCH_2D_PIXELS / float(np.prod(patch))))))


def normalization(fp: dict) -> tuple[list[ChannelNorm], list[str]]:
    """One :class:`ChannelNorm` per image channel (rule 6), with a note each."""
    norms, notes = [], []
    region = fp.get("intensity_region", "foreground")
    for stat in fp["intensity"]:
        name = stat["name"]
        if fp["rgb"]:
            norms.append(ChannelNorm(scheme="rgb"))
            notes.append(f"channel {stat['channel']} '{name}': rgb (x / 255)")
        elif is_ct_channel(name):
            std = stat["std"] if stat["std"] > 0 else 1.0  # constant foreground: avoid dividing by 0
            norms.append(ChannelNorm(scheme="ct", clip_low=stat["percentile_00_5"], clip_high=stat["percentile_99_5"], mean=stat["mean"], std=std))
            notes.append(
                f"channel {stat['channel']} '{name}': ct, clip to [{stat['percentile_00_5']:.4g}, {stat['percentile_99_5']:.4g}] "
                f"then (x - {stat['mean']:.4g}) / {std:.4g} ({region} percentiles 0.5/99.5, mean, std)"
            )
        else:
            norms.append(ChannelNorm(scheme="zscore"))
            notes.append(f"channel {stat['channel']} '{name}': zscore per image")
    return norms, notes


def label_values(dataset: RawDataset, fp: dict) -> list[int]:
    """Sorted declared label values with 0; raises when the label maps hold undeclared values."""
    declared = set(dataset.spec.labels.values()) | {0}
    unknown = sorted(set(fp["label_values_found"]) - declared)
    if unknown:
        raise MedalloyError(
            f"label maps hold values {unknown} not declared in dataset.json 'labels'",
            dataset.root / "dataset.json",
            "declare them under 'labels' or fix the label maps",
        )
    return sorted(declared)


# -- public API --------------------------------------------------------------------------------
def plan_dataset(
    dataset: RawDataset,
    fp: dict | None = None,
    *,
    max_2d_side: int = 256,
    max_3d_voxels: int = 64**3,
    base_filters: int = 16,
    max_filters: int = 256,
    batch_2d: int | None = None,
    force_dim: int | None = None,
    max_2d_patch: int | None = None,
    resolution_factor: float = 1.0,
) -> Plan:
    """Make a :class:`Plan` for ``dataset`` by the rules in the module docstring.

    ``resolution_factor`` > 1 trains at a coarser resolution: the target spacing of rule 2 times
    it (nnU-Net's lower-resolution stage; predictions are resampled back to each image's geometry).

    ``fp`` is the dataset's fingerprint (computed when None). ``Plan.median_shape`` is the raw
    median shape in array axes (all spatial axes, before resampling); ``target_spacing`` and
    ``patch_size`` are over the network's axes (the non-slice axes for 2D-per-slice plans).
    """
    _check_settings(max_2d_side, max_3d_voxels, base_filters, max_filters, batch_2d, force_dim, max_2d_patch)
    fp = fingerprint(dataset) if fp is None else fp
    _check_fingerprint(fp, dataset)
    notes = [
        f"dataset {fp['dataset']}: {len(fp['shapes'])} cases fingerprinted, {fp['dim']}D, median shape "
        f"{_fmt(fp['median_shape'])}, median spacing {_fmt(fp['median_spacing'])}"
    ]
    dim, slice_axis, reason = choose_dim(fp["median_shape"], fp["median_spacing"], force_dim)
    notes.append(reason)
    axes = [a for a in range(fp["dim"]) if a != slice_axis]
    spacing = [float(fp["median_spacing"][a]) for a in axes]
    if dim == 2:
        target, why = target_spacing_2d(resampled_median(fp["shapes"], fp["spacings"], axes, spacing), spacing, max_2d_side)
    else:
        target, why = target_spacing_3d(fp["shapes"], fp["spacings"], spacing, max_3d_voxels)
    notes.append(why)
    if resolution_factor != 1.0:
        if resolution_factor < 1.0:
            raise MedalloyError(f"resolution_factor {resolution_factor} < 1", fix="give 1 (the planner's resolution) or more (coarser)")
        target = [float(round(t * resolution_factor, 6)) for t in target]
        notes.append(f"target spacing {_fmt(target)}: x{resolution_factor:g} coarser (a lower-resolution plan; predictions resampled back)")
    median = resampled_median(fp["shapes"], fp["spacings"], axes, target)
    cap = max_2d_patch if dim == 2 else None
    patch, kernels, strides = patch_and_topology(median, target, dim, max_3d_voxels if dim == 3 else None, cap)
    pools = np.sum(np.asarray(strides) == 2, axis=0).tolist()
    cropped = cap is not None and any(round(float(m)) > cap for m in median)
    notes.append(
        f"patch {_fmt(patch)}: median resampled {'image' if dim == 2 else 'volume'} {_fmt([round(float(m), 1) for m in median])}"
        + (f" (within max_3d_voxels={max_3d_voxels})" if dim == 3 else "")
        + (f" cut to max_2d_patch={cap} per axis (random crops in training, sliding window in inference)" if cropped else "")
        + f", rounded up to multiples of 2**pools ({_fmt(pools)} poolings per axis)"
    )
    filters = [min(base_filters * 2**i, max_filters) for i in range(len(strides))]
    notes.append(f"DynUNet: {len(strides)} stages, strides {strides}, kernels {kernels}, filters {filters}")
    if dim == 2:
        batch = batch_2d if batch_2d is not None else batch_size_2d(patch)
        notes.append(f"batch size {batch}: " + ("given" if batch_2d is not None else f"~{BATCH_2D_PIXELS:g} pixels per step on CPU, in [2, 32]"))
    else:
        batch = BATCH_3D
        notes.append(f"batch size {batch}: 3D")
    norms, norm_notes = normalization(fp)
    notes.extend(norm_notes)
    values = label_values(dataset, fp)
    notes.append(f"classes: label values {values} ({', '.join(f'{v}={k}' for k, v in sorted(dataset.spec.labels.items(), key=lambda kv: kv[1]))})")
    return Plan(
        dataset=fp["dataset"],
        dim=dim,
        slice_axis=slice_axis,
        in_channels=len(fp["intensity"]),
        target_spacing=target,
        patch_size=patch,
        batch_size=int(batch),
        normalization=norms,
        label_values=values,
        labels=dict(dataset.spec.labels),
        network=NetworkPlan(kernels=kernels, strides=strides, filters=filters),
        median_shape=[int(round(s)) for s in fp["median_shape"]],
        median_spacing=[float(s) for s in fp["median_spacing"]],
        notes=notes,
    )


def train_cases_of(dataset: RawDataset, folds: int = 5) -> int:
    """The cases one fold of ``folds`` trains on (the experts' default split)."""
    n = len(dataset.labelled_cases())
    return max(1, n - -(-n // folds))


def plan_and_save(dataset_path: str | Path, out_path: str | Path, overwrite: bool = False, **kw: Any) -> Plan:
    """Fingerprint and plan the dataset at ``dataset_path``; write the plan to ``out_path`` and the
    fingerprint to ``fingerprint.json`` beside it.

    ``max_cases``, ``seed`` and ``progress`` in ``kw`` go to :func:`fingerprint`; with
    ``budget_minutes`` (and ``step_seconds``, ``train_cases``, ``machine``) the plan is the budget
    planner's (:func:`medalloy.planning.budget.choose_for_budget`); the rest go to :func:`plan_dataset`. Existing files are only replaced with ``overwrite=True``; both are
    checked before any work is done.
    """
    out = Path(out_path)
    fp_path = out.parent / FINGERPRINT_NAME
    if out.name == FINGERPRINT_NAME:
        raise MedalloyError(f"the plan cannot be named {FINGERPRINT_NAME} (the fingerprint is written there)", out, "choose another file name, e.g. plan.json")
    for path in (out, fp_path):
        if path.exists() and not overwrite:
            raise MedalloyError("file already exists", path, "pass overwrite=True (--overwrite) or choose another output folder")
    dataset = RawDataset(dataset_path)
    fp_kw = {k: kw.pop(k) for k in ("max_cases", "seed", "progress") if k in kw}
    budget = {k: kw.pop(k) for k in ("budget_minutes", "step_seconds", "train_cases", "machine") if k in kw}
    fp = fingerprint(dataset, **fp_kw)
    if budget.get("budget_minutes"):
        from medalloy.planning.budget import choose_for_budget

        cases = budget.get("train_cases") or train_cases_of(dataset)
        plan = choose_for_budget(dataset, fp, budget["budget_minutes"], budget["step_seconds"], cases, machine=budget.get("machine", ""), **kw)
    else:
        plan = plan_dataset(dataset, fp, **kw)
    save_fingerprint(fp, fp_path, overwrite=True)
    save_plan(plan, out)
    return plan


def plan_images_2d(size: int, in_channels: int = 1, name: str = "images", base_filters: int = 16, max_filters: int = 256) -> Plan:
    """The plan the rules above give a 2D dataset of ``size x size`` images at 1 mm with per-image
    z-score normalisation and no labels: the network an image-only model (a pretrained encoder)
    shares with the experts of such images (JSRT at 224 px and Shenzhen at 256 px get the same
    six stages)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        raise MedalloyError(f"image size must be an integer >= 16, got {size!r}", fix="pass e.g. --image-size 224")
    patch, kernels, strides = patch_and_topology(np.asarray([size, size], float), [1.0, 1.0], 2, None)
    filters = [min(base_filters * 2**i, max_filters) for i in range(len(strides))]
    return Plan(
        dataset=name,
        dim=2,
        in_channels=in_channels,
        target_spacing=[1.0, 1.0],
        patch_size=patch,
        batch_size=batch_size_2d(patch),
        normalization=[ChannelNorm(scheme="zscore") for _ in range(in_channels)],
        label_values=[0],
        labels={"background": 0},
        network=NetworkPlan(kernels=kernels, strides=strides, filters=filters),
        notes=[f"{size} px 2D images: DynUNet {len(strides)} stages, strides {strides}, filters {filters}"],
    )
