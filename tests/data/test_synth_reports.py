"""Tests of the synthetic image-report pairs (medalloy.data.synth_reports)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest

from medalloy.data.io import read_any
from medalloy.data.reports import ReportColumns, read_report_pairs, read_text_pairs
from medalloy.data.synth_reports import CLASSES, generate_report_pairs, render_report_case, text_only_report
from medalloy.errors import MedalloyError

N, SIZE, TEXT_ONLY = 8, 64, 5


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return generate_report_pairs(tmp_path_factory.mktemp("reports"), n_cases=N, seed=0, size=SIZE, text_only=TEXT_ONLY, progress=False)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_layout_and_determinism(folder: Path, tmp_path: Path) -> None:
    files = _files(folder)
    assert folder.name == "SynthCXRText"
    assert sorted(files) == sorted([f"images/case{i:04d}.png" for i in range(N)] + ["pairs.csv", "reports.csv"])
    assert list(_rows(folder / "pairs.csv")[0]) == ["image", "patient", "finding", "findings", "impression"]
    assert list(_rows(folder / "reports.csv")[0]) == ["uid", "findings", "impression"]
    again = generate_report_pairs(tmp_path / "a", n_cases=N, seed=0, size=SIZE, text_only=TEXT_ONLY, progress=False)
    assert _files(again) == files  # same seed, same bytes
    other = generate_report_pairs(tmp_path / "b", n_cases=N, seed=1, size=SIZE, text_only=TEXT_ONLY, progress=False)
    assert _files(other)["images/case0000.png"] != files["images/case0000.png"]
    assert _files(other)["reports.csv"] != files["reports.csv"]
    # an existing folder is refused unless overwrite, and nothing is left behind either way
    with pytest.raises(MedalloyError, match="overwrite"):
        generate_report_pairs(tmp_path / "a", n_cases=2, text_only=0, progress=False)
    generate_report_pairs(tmp_path / "a", n_cases=2, size=SIZE, text_only=0, overwrite=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["SynthCXRText"]
    assert len(list((tmp_path / "a" / "SynthCXRText" / "images").iterdir())) == 2
    with pytest.raises(MedalloyError, match="n_cases"):
        generate_report_pairs(tmp_path / "c", n_cases=0, progress=False)


def test_render_equals_written(folder: Path) -> None:
    for i, row in enumerate(_rows(folder / "pairs.csv")):
        image, info = render_report_case(i, seed=0, size=SIZE)
        assert image.dtype == np.uint8 and image.shape == (1, SIZE, SIZE)
        assert np.array_equal(read_any(folder / row["image"])[0], image)
        assert row == {
            "image": f"images/case{i:04d}.png",
            "patient": info["patient"],
            "finding": info["finding"],
            "findings": info["findings"],
            "impression": info["impression"],
        }
    assert [r["uid"] for r in _rows(folder / "reports.csv")] == [f"r{j:05d}" for j in range(TEXT_ONLY)]
    assert _rows(folder / "reports.csv")[2]["findings"] == text_only_report(2)["findings"]


def test_class_mix_and_patients() -> None:
    infos = [render_report_case(i, size=32)[1] for i in range(16)]
    for block in range(4):  # every four consecutive cases hold each class once
        assert sorted(info["finding"] for info in infos[4 * block : 4 * block + 4]) == sorted(CLASSES)
    assert [info["patient"] for info in infos[:4]] == ["p0000", "p0000", "p0001", "p0001"]
    text_classes = [text_only_report(j)["finding"] for j in range(40)]
    assert set(text_classes) == set(CLASSES)


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=\.) ", text) if s]


def test_texts_describe_the_finding() -> None:
    for i in range(16):
        _, info = render_report_case(i, size=32)
        findings, impression, finding = info["findings"], info["impression"], info["finding"]
        assert 2 <= len(_sentences(findings)) <= 4 and len(_sentences(impression)) == 1, info
        text = f"{findings} {impression}".lower()
        if finding == "No Finding":
            assert "normal" in text and not re.search(r"enlarged|cardiomegaly|pneumonia|patchy|fluid|blunting|lobe", text)
        elif finding == "Cardiomegaly":
            assert ("enlarged" in findings.lower() or "cardiomegaly" in findings.lower()) and re.search("cardiomegaly|enlarged", impression.lower())
        elif finding == "Effusion":
            assert "effusion" in impression.lower() and info["size"] in findings.lower()
        else:
            assert f"{info['side']} {info['zone']} lobe" in findings.lower() and f"{info['side']} {info['zone']} lobe" in impression.lower()


def _pathology(index: int, finding: str) -> tuple[np.ndarray, dict]:
    """The image difference a finding makes to the same case (same anatomy, acquisition and noise)."""
    base, _ = render_report_case(index, size=SIZE, finding="No Finding")
    image, info = render_report_case(index, size=SIZE, finding=finding)
    return image[0].astype(float) - base[0].astype(float), info


def test_pathology_is_visible_where_the_text_says() -> None:
    half = SIZE // 2
    for i in range(4):
        heart, _ = _pathology(i, "Cardiomegaly")
        assert heart.min() >= 0 and (heart > 20).mean() > 0.02  # a larger bright heart silhouette replaces dark lung
        assert heart[half:, SIZE // 4 : -SIZE // 8].mean() > 5 * max(heart[: SIZE // 8].mean(), 0.01)  # around the heart, not at the apices

        fluid, info = _pathology(i, "Effusion")
        on, off = (fluid[:, :half], fluid[:, half:]) if info["side"] == "right" else (fluid[:, half:], fluid[:, :half])  # image-left = patient's right
        quarter = SIZE // 4  # the lungs span rows ~0.15-0.75; the fluid fills their lowest fifth (small) or two fifths (moderate)
        assert on[half : 3 * quarter].mean() > 4 and on[:quarter].max() == 0 and off.mean() < 0.05 * on.mean()

        blob, info = _pathology(i, "Pneumonia")
        on, off = (blob[:, :half], blob[:, half:]) if info["side"] == "right" else (blob[:, half:], blob[:, :half])
        assert on.mean() > 1 and off.mean() < 0.05 * on.mean()
        row = (blob.sum(axis=1) * np.arange(SIZE)).sum() / blob.sum() / SIZE  # the opacity's centre row (lungs span ~0.12-0.7)
        assert row < 0.4 if info["zone"] == "upper" else row > 0.45


def test_texts_name_the_side_the_image_shows() -> None:
    seen = set()
    for i in range(16):
        _, info = render_report_case(i, size=32)
        if info["finding"] not in ("Effusion", "Pneumonia"):
            assert info["side"] is None and not re.search(r"\b(right|left)\b", f"{info['findings']} {info['impression']}".lower())
            continue
        diff, _ = _pathology(i, info["finding"])
        shown = "right" if diff[:, : SIZE // 2].sum() > diff[:, SIZE // 2 :].sum() else "left"  # image-left is the patient's right
        other = {"right": "left", "left": "right"}[shown]
        assert info["side"] == shown
        for text in (info["findings"].lower(), info["impression"].lower()):
            assert re.search(rf"\b{shown}\b", text) and not re.search(rf"\b{other}\b", text)
        seen.add((info["finding"], shown))
    assert len(seen) >= 3


def test_the_reader_reads_what_was_written(folder: Path) -> None:
    table = read_report_pairs(folder / "pairs.csv", ReportColumns(label="finding"))
    assert len(table.pairs) == N and table.skipped == {}
    for i, pair in enumerate(table.pairs):
        _, info = render_report_case(i, size=SIZE)
        assert pair.image == folder / "images" / f"case{i:04d}.png" and pair.image.is_file()
        assert (pair.label, pair.patient, pair.findings, pair.impression) == (info["finding"], info["patient"], info["findings"], info["impression"])
    text = read_text_pairs(folder / "reports.csv")
    assert len(text.pairs) == TEXT_ONLY and all(p.image is None and p.findings and p.impression for p in text.pairs)
