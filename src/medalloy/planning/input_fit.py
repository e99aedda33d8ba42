"""Which training dataset's preprocessing suits images from a new site, from their geometry alone.

A model of several datasets preprocesses each with its own plan (spacing, normalisation). Images
of an unknown site need one of them: :func:`choose_plan` compares the inputs' median size with
each candidate's fingerprint (``Plan.median_shape`` and ``Plan.median_spacing``) and picks the
closest. Images whose format carries a physical spacing (NIfTI, DICOM) are compared by extent in
millimetres and resampled by their spacing as in training. Natural images (PNG, JPEG) carry none:
they are compared by pixels, and where no candidate is within :data:`FIT_TOLERANCE` of their size
each image is resampled to the chosen dataset's typical size (:func:`as_trained`), since a lung
at twice the pixels it was trained at is a different picture to the network (measured: a chest
X-ray model scored lung Dice 0.66 on 512 px images through a 224 px dataset's preprocessing,
0.92 through the 512 px one's).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from medalloy.data.dataset import RawDataset
from medalloy.data.io import ImageMeta, read_geometry
from medalloy.planning.plan import Plan

# Sizes within this factor of a dataset's median count as that dataset's geometry.
FIT_TOLERANCE = 1.25
GEOMETRY_SAMPLE = 64  # cases whose headers give a set's median geometry
NO_SPACING_KINDS = ("png",)  # formats without a physical spacing (PNG, JPEG)


@dataclass(frozen=True)
class InputGeometry:
    """The median geometry of a set of input images: spatial ``shape`` (array axes), ``spacing``
    (None when their format carries none) and ``channels``."""

    shape: tuple[float, ...]
    spacing: tuple[float, ...] | None
    channels: int

    def describe(self) -> str:
        size = "x".join(f"{s:g}" for s in self.shape)
        return f"{size} px" if self.spacing is None else f"{size} voxels of {'x'.join(f'{s:.3g}' for s in self.spacing)} mm"


@dataclass(frozen=True)
class PlanFit:
    """The chosen dataset, whether natural images are resampled to its typical size, and why (one line)."""

    dataset: str
    rescale: bool
    reason: str


def geometry_of(metas: Sequence[ImageMeta]) -> InputGeometry:
    """Per-axis medians of ``metas`` (images of one dimensionality); spacing None if any has none."""
    if not metas:
        raise ValueError("no images to measure")
    ndims = {m.ndim for m in metas}
    if len(ndims) != 1:
        raise ValueError(f"images of {sorted(ndims)} dimensions mixed")
    shape = tuple(float(x) for x in np.median(np.asarray([m.shape for m in metas], float), axis=0))
    physical = all(m.kind not in NO_SPACING_KINDS for m in metas)
    spacing = tuple(float(x) for x in np.median(np.asarray([m.spacing for m in metas], float), axis=0)) if physical else None
    channels = int(np.median([m.channels for m in metas]))
    return InputGeometry(shape, spacing, channels)


def geometry_of_files(cases: Sequence[Sequence[Path]], sample: int = GEOMETRY_SAMPLE) -> InputGeometry:
    """The median geometry of up to ``sample`` cases (each its image files), evenly spread in the
    given order, from their headers (no pixels are decoded for PNG, JPEG or NIfTI)."""
    picked = list(cases)[:: max(1, -(-len(cases) // sample))]
    return geometry_of([read_geometry(list(files)) for files in picked])


def dataset_geometry(ds: RawDataset) -> InputGeometry:
    """The median geometry of a raw dataset's labelled cases (a property of the set, so training
    and evaluation decide alike whatever cases they take)."""
    return geometry_of_files([c.images for c in ds.labelled_cases()])


def _typical(plan: Plan, physical: bool) -> np.ndarray | None:
    """The dataset's median extent: millimetres where both sides know spacing, else pixels."""
    if not plan.median_shape:
        return None
    shape = np.asarray(plan.median_shape, float)
    if physical and len(plan.median_spacing) == len(shape):
        return shape * np.asarray(plan.median_spacing, float)
    return shape


def size_ratio(plan: Plan, geometry: InputGeometry) -> float | None:
    """How many times larger or smaller (>= 1) the inputs are than the dataset's median, as the
    geometric mean over axes; None when the plan cannot take these images (dimensions, channels)
    or has no fingerprint."""
    if len(plan.median_shape) != len(geometry.shape) or geometry.channels != len(plan.normalization):  # normalisation is per channel
        return None
    physical = geometry.spacing is not None and len(plan.median_spacing) == len(geometry.shape)
    typical = _typical(plan, physical)
    if typical is None or np.any(typical <= 0):
        return None
    extent = np.asarray(geometry.shape, float) * (np.asarray(geometry.spacing, float) if physical else 1.0)
    return float(math.exp(np.mean(np.abs(np.log(extent / typical)))))


def choose_plan(plans: dict[str, Plan], geometry: InputGeometry, tolerance: float = FIT_TOLERANCE) -> PlanFit:
    """The candidate (``plans``, in preference order) whose median size is closest to the inputs'
    (ties: the first). Natural images that no candidate fits within ``tolerance`` are resampled to
    the closest one's size; images with a spacing never are (their spacing says their scale)."""
    if not plans:
        raise ValueError("no candidate plans")
    ratios = {name: size_ratio(plan, geometry) for name, plan in plans.items()}
    known = {n: r for n, r in ratios.items() if r is not None}
    if not known:
        first = next(iter(plans))
        return PlanFit(first, False, f"no candidate's fingerprint matches {geometry.describe()} images; the first, {first}")
    best = min(known, key=lambda n: known[n])  # min keeps the first of equals
    others = ", ".join(f"{n} x{r:.2f}" for n, r in known.items() if n != best)
    versus = f" (others: {others})" if others else ""
    typical = "x".join(str(s) for s in plans[best].median_shape)
    if known[best] <= tolerance:
        return PlanFit(best, False, f"inputs of {geometry.describe()} are closest to {best}'s typical {typical} (x{known[best]:.2f}){versus}")
    if geometry.spacing is None:
        reason = (
            f"inputs of {geometry.describe()} fit no candidate within x{tolerance:g}; the closest is {best}, typical {typical} (x{known[best]:.2f}){versus}"
        )
        return PlanFit(best, True, reason)
    return PlanFit(best, False, f"inputs of {geometry.describe()} are closest to {best}'s typical {typical} (x{known[best]:.2f}, by their spacing){versus}")


def misfit(plan: Plan, geometry: InputGeometry, tolerance: float = FIT_TOLERANCE) -> float | None:
    """The size ratio of natural images (no spacing) that ``plan``'s data does not fit within
    ``tolerance`` (they are then best resampled to its typical size); None otherwise."""
    ratio = size_ratio(plan, geometry)
    return ratio if geometry.spacing is None and ratio is not None and ratio > tolerance else None


def rescale_note(plan: Plan, geometry: InputGeometry) -> str | None:
    """The one line prediction says when natural images of ``geometry`` are resampled to ``plan``'s
    typical size (:func:`misfit`); None when they are taken as they are."""
    ratio = misfit(plan, geometry)
    if ratio is None:
        return None
    typical = "x".join(str(s) for s in plan.median_shape)
    return (
        f"inputs of {geometry.describe()} are x{ratio:.2f} off {plan.dataset}'s typical {typical} px (more than x{FIT_TOLERANCE:g}): "
        "each resampled to that size (--native-size keeps them as they are)"
    )


def as_trained(meta: ImageMeta, plan: Plan) -> ImageMeta:
    """``meta`` with the spacing that brings this image to ``plan``'s typical size (the same factor
    on every axis, so shapes keep their proportions); the grid and shape are kept, so predictions
    come back on the input's own pixels."""
    if len(plan.median_shape) != meta.ndim:
        return meta
    typical_spacing = np.asarray(plan.median_spacing, float) if len(plan.median_spacing) == meta.ndim else np.ones(meta.ndim)
    factor = float(math.exp(np.mean(np.log(np.asarray(plan.median_shape, float) / np.asarray(meta.shape, float)))))
    return replace(meta, spacing=tuple(float(s) for s in typical_spacing * factor))
