"""Cross-validation splits in nnU-Net's ``splits_final.json`` shape, grouped by patient.

A split file is a list with one entry per fold: ``[{"train": [case ids], "val": [case ids]}, ...]``.
Cases are grouped by :attr:`Case.group` (the patient when known), so one patient's cases are never
on both sides of a fold. ``fold=-1`` means nnU-Net's ``all``: train on every case, validate on none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medalloy.data.dataset import Case, RawDataset
from medalloy.errors import MedalloyError
from medalloy.jsonio import read_json, write_json_atomic

SPLITS_FILE = "splits_final.json"
ALL_FOLD = -1


def _check_unique_ids(cases: list[Case]) -> None:
    """Splits name cases by id, so two cases sharing one id cannot be told apart."""
    ids = [c.case_id for c in cases]
    dups = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
    if dups:
        raise MedalloyError(f"duplicate case ids {dups[:5]}", None, "give every case its own id")


def _groups(cases: list[Case]) -> dict[str, list[str]]:
    """``group -> sorted case ids``, the units that are assigned to folds whole."""
    groups: dict[str, list[str]] = {}
    for c in cases:
        groups.setdefault(c.group, []).append(c.case_id)
    return {g: sorted(ids) for g, ids in sorted(groups.items())}


def kfold_splits(cases: list[Case], k: int = 5, seed: int = 0) -> list[dict[str, list[str]]]:
    """``k`` folds whose validation sets partition the cases, never splitting a group (patient).

    Groups are shuffled with ``seed``, then placed largest first on the fold with the fewest cases
    so far (ties: lowest fold index), so fold sizes differ by at most the largest group's size
    (by at most 1 when every group is one case). The result depends only on the cases and ``seed``,
    not on the order of ``cases``.
    """
    if k < 2:
        raise MedalloyError(f"k={k} folds", None, "use at least 2 folds (or fold -1 to train on all cases)")
    _check_unique_ids(cases)
    groups = _groups(cases)
    if len(groups) < k:
        raise MedalloyError(f"{len(groups)} patients/cases cannot fill {k} folds", None, f"use at most {len(groups)} folds or add cases")
    names = list(groups)
    order = np.random.default_rng(seed).permutation(len(names))
    # A stable sort by size after the shuffle keeps the seed's order among equal-sized groups.
    shuffled = sorted((names[i] for i in order), key=lambda g: -len(groups[g]))
    val: list[list[str]] = [[] for _ in range(k)]
    for g in shuffled:
        target = min(range(k), key=lambda f: (len(val[f]), f))
        val[target].extend(groups[g])
    all_ids = sorted(c.case_id for c in cases)
    return [{"train": sorted(set(all_ids) - set(v)), "val": sorted(v)} for v in val]


def leave_one_source_out(cases: list[Case]) -> dict[str, dict[str, list[str]]]:
    """For each source: train on the other sources' cases, validate on this source's cases."""
    _check_unique_ids(cases)
    sources = sorted({c.source for c in cases})
    if len(sources) < 2:
        raise MedalloyError(
            f"only one source ({sources[0] if sources else 'none'}) in the dataset",
            None,
            "leave-one-source-out needs cases from at least 2 sources (set 'source' per case in dataset.json)",
        )
    return {
        s: {
            "train": sorted(c.case_id for c in cases if c.source != s),
            "val": sorted(c.case_id for c in cases if c.source == s),
        }
        for s in sources
    }


def _validate(splits: Any, path: Path | None) -> list[dict[str, list[str]]]:
    """Check the ``[{"train": [...], "val": [...]}, ...]`` shape; raise a one-line error otherwise."""
    fix = 'use nnU-Net\'s form [{"train": [case ids], "val": [case ids]}, ...]'
    if not isinstance(splits, list) or not splits:
        raise MedalloyError("splits must be a non-empty list of folds", path, fix)
    out = []
    for i, fold in enumerate(splits):
        if not isinstance(fold, dict) or set(fold) < {"train", "val"}:
            raise MedalloyError(f"fold {i} is not an object with 'train' and 'val'", path, fix)
        for key in ("train", "val"):
            ids = fold[key]
            if not isinstance(ids, list) or not all(isinstance(x, str) for x in ids):
                raise MedalloyError(f"fold {i} '{key}' is not a list of case ids (strings)", path, fix)
            if len(set(ids)) != len(ids):
                raise MedalloyError(f"fold {i} '{key}' lists a case twice", path, "list each case once")
        both = sorted(set(fold["train"]) & set(fold["val"]))
        if both:
            raise MedalloyError(f"fold {i}: cases {both[:5]} are in both train and val", path, "put each case on one side only")
        out.append({"train": list(fold["train"]), "val": list(fold["val"])})
    return out


def save_splits(splits: list[dict] | dict[str, dict], path: str | Path, overwrite: bool = False) -> None:
    """Write splits as ``splits_final.json`` (atomically; an existing file only with ``overwrite``).

    A leave-one-source-out dict is written as a list in sorted source order (fold i = i-th source).
    """
    path = Path(path)
    if isinstance(splits, dict):
        splits = [splits[s] for s in sorted(splits)]
    folds = _validate(splits, path)
    if path.exists() and not overwrite:
        raise MedalloyError("splits file already exists", path, "pass overwrite=True (--overwrite) or choose another path")
    write_json_atomic(path, folds)


def load_splits(path: str | Path) -> list[dict]:
    """Read and validate a ``splits_final.json``."""
    path = Path(path)
    raw = read_json(path, "splits file", "check the path or make one with `medalloy data split`")
    return _validate(raw, path)


def split_for_fold(dataset: RawDataset, fold: int, k: int = 5, seed: int = 0, splits_file: Path | None = None) -> tuple[list[Case], list[Case]]:
    """Train and validation cases (labelled only) of ``fold``; ``fold=-1`` trains on all of them.

    The split comes from ``splits_file`` if given, else ``<dataset>/splits_final.json`` if present
    (nnU-Net's convention), else :func:`kfold_splits` with ``k`` and ``seed``.
    """
    cases = dataset.labelled_cases()
    if fold == ALL_FOLD:
        return list(cases), []
    default = dataset.root / SPLITS_FILE
    if splits_file is not None:
        splits, where = load_splits(splits_file), Path(splits_file)
    elif default.exists():
        splits, where = load_splits(default), default
    else:
        splits, where = kfold_splits(cases, k, seed), None
    if not isinstance(fold, int) or isinstance(fold, bool) or not 0 <= fold < len(splits):
        raise MedalloyError(f"fold {fold} does not exist ({len(splits)} folds)", where, f"use a fold 0..{len(splits) - 1} or -1 for all cases")
    by_id = {c.case_id: c for c in cases}
    unknown = sorted((set(splits[fold]["train"]) | set(splits[fold]["val"])) - set(by_id))
    if unknown:
        raise MedalloyError(
            f"fold {fold} names {len(unknown)} case(s) not in {dataset.root.name} (or without a label): {unknown[:5]}",
            where,
            "make the splits again for this dataset",
        )
    return [by_id[i] for i in splits[fold]["train"]], [by_id[i] for i in splits[fold]["val"]]
