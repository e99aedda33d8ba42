"""Tests of the splits: k-fold by patient, leave-one-source-out, split files and split_for_fold."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from medalloy.data.dataset import Case, RawDataset, make_dataset_json
from medalloy.data.io import write_image, write_label
from medalloy.data.splits import kfold_splits, leave_one_source_out, load_splits, save_splits, split_for_fold
from medalloy.errors import MedalloyError
from medalloy.jsonio import write_json_atomic

# 7 patients with 3, 2, 2, 1, 1, 1, 1 cases (11 cases), from two sources
PATIENTS = {"p0": 3, "p1": 2, "p2": 2, "p3": 1, "p4": 1, "p5": 1, "p6": 1}


def _cases() -> list[Case]:
    cases = []
    for i, (patient, n) in enumerate(PATIENTS.items()):
        for j in range(n):
            cases.append(Case(f"{patient}_f{j}", [], None, source="A" if i % 2 == 0 else "B", patient=patient))
    return cases


def _patient(case_id: str) -> str:
    return case_id.split("_")[0]


@pytest.mark.parametrize("k", [2, 3, 5])
def test_kfold_partitions_cases_without_patient_leakage(k: int) -> None:
    cases = _cases()
    all_ids = sorted(c.case_id for c in cases)
    splits = kfold_splits(cases, k=k, seed=0)
    assert len(splits) == k
    vals = [v for fold in splits for v in fold["val"]]
    assert sorted(vals) == all_ids  # every case in exactly one val fold
    for fold in splits:
        assert sorted(fold["train"] + fold["val"]) == all_ids
        assert fold["val"], "no empty validation fold"
        assert not {_patient(i) for i in fold["train"]} & {_patient(i) for i in fold["val"]}


def test_kfold_is_balanced() -> None:
    singles = [Case(f"c{i:02d}", [], None) for i in range(11)]
    sizes = sorted(len(f["val"]) for f in kfold_splits(singles, k=3, seed=4))
    assert sizes == [3, 4, 4]
    # groups of 3,1,1,1 in 2 folds: the 3-case patient alone on one side, the three singles on the other
    grouped = [Case(f"a{i}", [], None, patient="big") for i in range(3)] + [Case(f"s{i}", [], None) for i in range(3)]
    splits = kfold_splits(grouped, k=2, seed=0)
    assert sorted(sorted(f["val"]) for f in splits) == [["a0", "a1", "a2"], ["s0", "s1", "s2"]]
    # with the PATIENTS sizes (11 cases, largest group 3) the folds differ by at most 3 cases
    for k in (2, 3, 4, 5):
        sizes = [len(f["val"]) for f in kfold_splits(_cases(), k=k, seed=1)]
        assert sum(sizes) == 11 and max(sizes) - min(sizes) <= 3


def test_kfold_is_deterministic_and_order_free() -> None:
    cases = _cases()
    first = kfold_splits(cases, k=3, seed=7)
    shuffled = list(cases)
    random.Random(1).shuffle(shuffled)
    assert kfold_splits(shuffled, k=3, seed=7) == first
    assert json.loads(json.dumps(first)) == first  # plain JSON types
    assert any(kfold_splits(cases, k=3, seed=s) != first for s in range(8)), "the seed changes the split"


def test_kfold_errors() -> None:
    with pytest.raises(MedalloyError, match="7 patients/cases cannot fill 8 folds; use at most 7 folds"):
        kfold_splits(_cases(), k=8)
    with pytest.raises(MedalloyError, match="at least 2 folds"):
        kfold_splits(_cases(), k=1)
    with pytest.raises(MedalloyError, match=r"duplicate case ids \['x'\]"):
        kfold_splits([Case("x", [], None), Case("x", [], None), Case("y", [], None)], k=2)


def test_leave_one_source_out_partition() -> None:
    cases = _cases()
    loso = leave_one_source_out(cases)
    assert sorted(loso) == ["A", "B"]
    by_source = {s: sorted(c.case_id for c in cases if c.source == s) for s in ("A", "B")}
    assert loso["A"] == {"train": by_source["B"], "val": by_source["A"]}
    assert loso["B"] == {"train": by_source["A"], "val": by_source["B"]}
    with pytest.raises(MedalloyError, match=r"only one source \(A\)"):
        leave_one_source_out([c for c in cases if c.source == "A"])


def test_save_load_round_trip(tmp_path: Path) -> None:
    splits = kfold_splits(_cases(), k=3)
    path = tmp_path / "splits_final.json"
    save_splits(splits, path)
    assert load_splits(path) == splits
    with pytest.raises(MedalloyError, match="already exists.*overwrite"):
        save_splits(splits, path)
    save_splits(leave_one_source_out(_cases()), path, overwrite=True)
    loaded = load_splits(path)
    assert [sorted(f["val"]) for f in loaded] == [sorted(v["val"]) for _, v in sorted(leave_one_source_out(_cases()).items())]


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("[{", "invalid JSON"),
        ("{}", "non-empty list"),
        ("[]", "non-empty list"),
        ('[{"train": ["a"]}]', "fold 0 is not an object with 'train' and 'val'"),
        ('[{"train": ["a"], "val": ["b"]}, {"train": "a", "val": []}]', "fold 1 'train' is not a list"),
        ('[{"train": ["a", 3], "val": []}]', "fold 0 'train' is not a list of case ids"),
        ('[{"train": ["a", "b"], "val": ["b"]}]', "in both train and val"),
        ('[{"train": ["a"], "val": ["b", "b"]}]', "fold 0 'val' lists a case twice"),
    ],
)
def test_load_errors(tmp_path: Path, content: str, words: str) -> None:
    path = tmp_path / "splits.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(MedalloyError, match=words) as exc:
        load_splits(path)
    assert str(exc.value).startswith(str(path))


def test_load_missing_file_and_save_invalid(tmp_path: Path) -> None:
    with pytest.raises(MedalloyError, match="splits file not found"):
        load_splits(tmp_path / "none.json")
    with pytest.raises(MedalloyError, match="in both train and val"):
        save_splits([{"train": ["a"], "val": ["a"]}], tmp_path / "s.json")
    assert not (tmp_path / "s.json").exists()


def _dataset(root: Path) -> RawDataset:
    """A tiny 2D dataset: the 11 cases of PATIENTS (8x8 PNGs) plus one case without a label."""
    rng = np.random.default_rng(0)
    extras = {}
    for c in _cases() + [Case("nolabel_f0", [], None)]:
        write_image(root / "imagesTr" / f"{c.case_id}_0000.png", rng.integers(0, 256, (1, 8, 8)).astype(np.uint8))
        if c.case_id != "nolabel_f0":
            write_label(root / "labelsTr" / f"{c.case_id}.png", rng.integers(0, 2, (8, 8)))
            extras[c.case_id] = {"source": c.source, "patient": c.patient}
    meta = make_dataset_json({"0": "x"}, {"background": 0, "a": 1}, 12, ".png", "T", cases=extras)
    write_json_atomic(root / "dataset.json", meta)
    return RawDataset(root)


def test_split_for_fold_without_file(tmp_path: Path) -> None:
    ds = _dataset(tmp_path / "Dataset020_S")
    expected = kfold_splits(ds.labelled_cases(), k=3, seed=2)
    train, val = split_for_fold(ds, 1, k=3, seed=2)
    assert sorted(c.case_id for c in train) == expected[1]["train"]
    assert sorted(c.case_id for c in val) == expected[1]["val"]
    assert "nolabel_f0" not in {c.case_id for c in train + val}
    assert all(c.patient == _patient(c.case_id) for c in train + val)
    train, val = split_for_fold(ds, -1)
    assert len(train) == 11 and val == []


def test_split_for_fold_uses_splits_final(tmp_path: Path) -> None:
    ds = _dataset(tmp_path / "Dataset021_S")
    ids = sorted(c.case_id for c in ds.labelled_cases())
    custom = [{"train": ids[2:], "val": ids[:2]}, {"train": ids[:2], "val": ids[2:]}]
    save_splits(custom, ds.root / "splits_final.json")
    train, val = split_for_fold(ds, 0)
    assert [c.case_id for c in val] == ids[:2] and [c.case_id for c in train] == ids[2:]
    other = tmp_path / "other.json"
    save_splits([{"train": ids[:1], "val": ids[5:6]}], other)
    train, val = split_for_fold(ds, 0, splits_file=other)
    assert [c.case_id for c in train] == ids[:1] and [c.case_id for c in val] == ids[5:6]
    with pytest.raises(MedalloyError, match=r"fold 2 does not exist \(2 folds\)"):
        split_for_fold(ds, 2)


def test_split_for_fold_unknown_ids(tmp_path: Path) -> None:
    ds = _dataset(tmp_path / "Dataset022_S")
    bad = tmp_path / "bad.json"
    save_splits([{"train": ["p0_f0", "ghost"], "val": ["nolabel_f0"]}], bad)
    with pytest.raises(MedalloyError, match=r"names 2 case\(s\) not in Dataset022_S.*'ghost', 'nolabel_f0'"):
        split_for_fold(ds, 0, splits_file=bad)
    with pytest.raises(MedalloyError, match="fold 5 does not exist"):
        split_for_fold(ds, 5, k=3)
