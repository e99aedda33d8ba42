"""Dataset fingerprint: the facts about a raw dataset that planning decisions are made from.

The fingerprint is a JSON-serialisable dict (string keys only, so ``json.loads(json.dumps(fp)) == fp``)::

    dataset, num_cases, num_cases_fingerprinted, num_labelled_cases, case_ids, max_cases, seed,
    dim                 2 or 3 spatial axes
    num_channels        image channels as read (3 for RGB in one file)
    channel_names       one name per image channel ("R", "G", "B" for RGB)
    rgb                 True when the images are RGB photos/screens stored in one file
    shapes, spacings    per fingerprinted case, spatial array order
    median_shape        per-axis median of ``shapes`` (float, may end in .5)
    median_spacing      per-axis median of ``spacings``
    intensity_region    "foreground" (label > 0) or "all" when no case has any foreground
    intensity           per channel: name, mean, std, percentile_00_5, percentile_99_5, min, max,
                        num_voxels (number of sampled voxels the statistics are computed on)
    label_values_found  sorted label values present in the label maps
    labels              {"<value>": {"name", "voxel_fraction", "num_cases"}} for every declared
                        or found value; ``voxel_fraction`` = mean over labelled cases of
                        (#voxels == value) / (#voxels), ``num_cases`` = labelled cases containing it
    cases_per_source    {source: count} over *all* cases of the dataset (not only the sampled ones)

Intensity statistics follow nnU-Net: for each labelled case, at most ``VOXELS_PER_CASE`` foreground
voxels are drawn without replacement (all of them when there are fewer) with one seeded generator,
the same positions for every channel; the statistics are computed over the pooled samples.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from medalloy.data.dataset import Case, RawDataset
from medalloy.errors import MedalloyError
from medalloy.jsonio import read_json, write_json_atomic

VOXELS_PER_CASE = 10_000
_NATURAL_ENDINGS = (".png", ".jpg", ".jpeg")


def _select_cases(dataset: RawDataset, max_cases: int | None, rng: np.random.Generator) -> list[Case]:
    """All cases, or a seeded random subset of ``max_cases`` kept in dataset order."""
    cases = list(dataset.cases)
    if not cases:
        raise MedalloyError("no training cases in imagesTr/", dataset.root, "add CASE_0000 image files to imagesTr/")
    if max_cases is not None:
        if max_cases < 1:
            raise MedalloyError(f"max_cases must be >= 1 (got {max_cases})", fix="give a positive number or None for all cases")
        if max_cases < len(cases):
            keep = np.sort(rng.choice(len(cases), size=max_cases, replace=False))
            cases = [cases[int(i)] for i in keep]
    return cases


def _is_rgb(dataset: RawDataset, first_case: Case, num_channels: int) -> bool:
    """RGB when dataset.json names the channels R, G, B, or one PNG/JPG file per case holds 3 channels."""
    if dataset.spec.is_rgb:
        return True
    one_natural_file = len(first_case.images) == 1 and first_case.images[0].name.lower().endswith(_NATURAL_ENDINGS)
    return one_natural_file and num_channels == 3


def _channel_names(dataset: RawDataset, num_channels: int, rgb: bool) -> list[str]:
    if rgb:
        return ["R", "G", "B"]
    names = [v for _, v in sorted(dataset.spec.channel_names.items(), key=lambda kv: int(kv[0]))]
    if len(names) != num_channels:
        raise MedalloyError(
            f"dataset.json names {len(names)} channels but the images have {num_channels}",
            dataset.root / "dataset.json",
            "give one channel_names entry per image channel",
        )
    return names


def _check_case(case: Case, image: np.ndarray, shape: tuple[int, ...], spacing: tuple[float, ...], dim: int, first_channels: int) -> None:
    """Every case must match the first one's dimension and channel count and have a usable header."""
    where = case.images[0]
    channels = image.shape[0]
    if len(shape) != dim:
        raise MedalloyError(f"case has {len(shape)} spatial axes but earlier cases have {dim}", where, "keep all images of a dataset 2D or all 3D")
    if channels != first_channels:
        raise MedalloyError(f"case has {channels} channels but earlier cases have {first_channels}", where, "give every case the same channels")
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise MedalloyError(f"voxel spacing {tuple(spacing)} is not positive", where, "fix the spacing (pixdim) in the image header")
    if not np.all(np.isfinite(image)):
        raise MedalloyError("image holds NaN or inf", where, "replace non-finite voxels before planning")


class _Accumulator:
    """Running per-case facts, turned into the fingerprint dict by :meth:`result`."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.shapes: list[list[int]] = []
        self.spacings: list[list[float]] = []
        self.case_ids: list[str] = []
        self.fg_samples: list[np.ndarray] = []  # (C, n) per labelled case
        self.all_samples: list[np.ndarray] = []  # fallback when no foreground exists anywhere
        self.label_fractions: list[np.ndarray] = []  # bincount / size per labelled case
        self.label_present: list[np.ndarray] = []

    def _sample(self, values: np.ndarray) -> np.ndarray:
        """At most VOXELS_PER_CASE columns of ``values`` (C, n), without replacement."""
        n = values.shape[1]
        if n <= VOXELS_PER_CASE:
            return values
        idx = self.rng.choice(n, size=VOXELS_PER_CASE, replace=False)
        return values[:, np.sort(idx)]

    def add(self, case: Case, image: np.ndarray, label: np.ndarray | None, shape: tuple[int, ...], spacing: tuple[float, ...]) -> None:
        self.case_ids.append(case.case_id)
        self.shapes.append([int(s) for s in shape])
        self.spacings.append([float(s) for s in spacing])
        flat = image.reshape(image.shape[0], -1)
        if label is None:
            self.all_samples.append(self._sample(flat))
            return
        lab = label.reshape(-1)
        if lab.size and lab.min() < 0:
            raise MedalloyError("label map holds negative values", case.label, "use label values 0, 1, 2 ...")
        counts = np.bincount(lab)
        self.label_fractions.append(counts / max(lab.size, 1))
        self.label_present.append(counts > 0)
        fg = lab > 0
        if fg.any():
            self.fg_samples.append(self._sample(flat[:, fg]))
        elif not self.fg_samples:
            # Only kept while no foreground has been seen: the "all voxels" fallback needs it.
            self.all_samples.append(self._sample(flat))

    def intensity(self, names: list[str]) -> tuple[str, list[dict[str, Any]]]:
        region, pools = ("foreground", self.fg_samples) if self.fg_samples else ("all", self.all_samples)
        samples = np.concatenate(pools, axis=1).astype(np.float64)
        stats = []
        for c, name in enumerate(names):
            v = samples[c]
            p_low, p_high = np.percentile(v, [0.5, 99.5])
            stats.append(
                {
                    "channel": c,
                    "name": name,
                    "mean": float(v.mean()),
                    "std": float(v.std()),
                    "percentile_00_5": float(p_low),
                    "percentile_99_5": float(p_high),
                    "min": float(v.min()),
                    "max": float(v.max()),
                    "num_voxels": int(v.size),
                }
            )
        return region, stats

    def labels(self, declared: dict[str, int]) -> tuple[list[int], dict[str, dict[str, Any]]]:
        width = max([len(f) for f in self.label_fractions] + [max(declared.values(), default=0) + 1])
        fractions = np.zeros((len(self.label_fractions), width))
        present = np.zeros((len(self.label_present), width), dtype=bool)
        for i, (f, p) in enumerate(zip(self.label_fractions, self.label_present)):
            fractions[i, : len(f)] = f
            present[i, : len(p)] = p
        found = [int(v) for v in np.flatnonzero(present.any(axis=0))] if len(present) else []
        names = {v: k for k, v in declared.items()}
        out = {}
        for value in sorted(set(found) | set(declared.values())):
            out[str(value)] = {
                "name": names.get(value),
                "voxel_fraction": float(fractions[:, value].mean()) if len(fractions) else 0.0,
                "num_cases": int(present[:, value].sum()),
            }
        return found, out


def fingerprint(dataset: RawDataset, max_cases: int | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Read every case (or a seeded subset of ``max_cases``) and summarise the dataset.

    Deterministic given ``seed`` (case subset and voxel samples). See the module docstring for the
    keys. Raises :class:`MedalloyError` on an empty dataset, mixed 2D/3D cases, differing channel
    counts, non-positive spacing or non-finite intensities.
    """
    rng = np.random.default_rng(seed)
    cases = _select_cases(dataset, max_cases, rng)
    acc = _Accumulator(rng)
    dim = channels = None
    for case in tqdm(cases, desc=f"fingerprint {dataset.name}", unit="case", disable=not progress, leave=False):
        image, label, meta = dataset.load(case)
        if dim is None:
            dim, channels = len(meta.shape), image.shape[0]
        _check_case(case, image, tuple(meta.shape), tuple(meta.spacing), dim, channels)
        acc.add(case, image, label, tuple(meta.shape), tuple(meta.spacing))
    assert dim is not None and channels is not None
    rgb = _is_rgb(dataset, cases[0], channels)
    names = _channel_names(dataset, channels, rgb)
    region, intensity = acc.intensity(names)
    found, labels = acc.labels(dataset.spec.labels)
    return {
        "dataset": dataset.name,
        "num_cases": len(dataset.cases),
        "num_cases_fingerprinted": len(cases),
        "num_labelled_cases": len(acc.label_fractions),
        "max_cases": max_cases,
        "seed": seed,
        "dim": dim,
        "num_channels": channels,
        "channel_names": names,
        "rgb": rgb,
        "case_ids": acc.case_ids,
        "shapes": acc.shapes,
        "spacings": acc.spacings,
        "median_shape": [float(x) for x in np.median(np.asarray(acc.shapes, dtype=float), axis=0)],
        "median_spacing": [float(x) for x in np.median(np.asarray(acc.spacings, dtype=float), axis=0)],
        "intensity_region": region,
        "intensity": intensity,
        "label_values_found": found,
        "labels": labels,
        "cases_per_source": dict(sorted(Counter(c.source for c in dataset.cases).items())),
    }


def save_fingerprint(fp: dict, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``fp`` as JSON (atomically); refuses to replace an existing file unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise MedalloyError("fingerprint already exists", path, "pass overwrite=True (--overwrite) or choose another path")
    write_json_atomic(path, fp)
    return path


def load_fingerprint(path: str | Path) -> dict:
    """Read a fingerprint written by :func:`save_fingerprint`."""
    return read_json(path, "fingerprint", "make one with `medalloy plan DATASET`", "delete it and plan again")
