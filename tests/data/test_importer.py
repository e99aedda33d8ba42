"""Tests of import_folders: images/ + masks/ into an nnU-Net raw PNG dataset, and every refusal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medalloy.data.check import check_dataset
from medalloy.data.dataset import RawDataset
from medalloy.data.importer import convert_mask, import_folders, make_case_id
from medalloy.data.io import read_any
from medalloy.errors import MedalloyError


def _rgb(seed: int, size: tuple[int, int] = (8, 10)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(*size, 3)).astype(np.uint8)


def _mask(seed: int, size: tuple[int, int] = (8, 10), values: tuple[int, ...] = (0, 255)) -> np.ndarray:
    return np.random.default_rng(100 + seed).choice(values, size=size).astype(np.uint8)


def make_input(root: Path, stems: list[str], grey: bool = False, img_ext: str = ".png", mask_ext: str = ".png", values=(0, 255)) -> tuple[Path, Path]:
    """``root/images/<stem><img_ext>`` and ``root/masks/<stem><mask_ext>``, 8x10 pixels."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for i, stem in enumerate(stems):
        img = _rgb(i)
        Image.fromarray(img[..., 0] if grey else img).save(root / "images" / f"{stem}{img_ext}")
        Image.fromarray(_mask(i, values=values)).save(root / "masks" / f"{stem}{mask_ext}")
    return root / "images", root / "masks"


def _json(out: Path) -> dict:
    return json.loads((out / "dataset.json").read_text(encoding="utf-8"))


def test_rgb_import_writes_nnunet_layout(tmp_path: Path) -> None:
    images, masks = make_input(tmp_path / "in", ["a", "b", "c"])
    out = tmp_path / "Dataset201_Polyp"
    ds = import_folders(images, masks, out, source="Kvasir", labels={"polyp": 1}, progress=False)
    data = _json(out)
    assert data["channel_names"] == {"0": "R", "1": "G", "2": "B"}
    assert data["labels"] == {"background": 0, "polyp": 1}
    assert data["numTraining"] == 3 and data["file_ending"] == ".png" and data["name"] == "Polyp"
    assert data["medalloy"]["cases"] == {f"Kvasir_{s}": {"source": "Kvasir"} for s in "abc"}
    assert "modality" not in data["medalloy"]
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["Kvasir_a_0000.png", "Kvasir_b_0000.png", "Kvasir_c_0000.png"]
    assert [c.case_id for c in ds.cases] == ["Kvasir_a", "Kvasir_b", "Kvasir_c"]
    # pixels round-trip exactly, RGB in one file; the 0/255 mask becomes 0/1
    img, meta = read_any(out / "imagesTr" / "Kvasir_b_0000.png")
    assert meta.channels == 3 and np.array_equal(np.moveaxis(img, 0, -1), _rgb(1))
    lab = np.asarray(Image.open(out / "labelsTr" / "Kvasir_b.png"))
    assert lab.dtype == np.uint8 and np.array_equal(lab, (_mask(1) == 255).astype(np.uint8))
    assert check_dataset(out, progress=False) == []


def test_grey_import_and_modality(tmp_path: Path) -> None:
    images, masks = make_input(tmp_path / "in", ["x"], grey=True)
    out = tmp_path / "Dataset002_Cxr"
    import_folders(images, masks, out, source="S", progress=False, modality="X-ray")
    data = _json(out)
    assert data["channel_names"] == {"0": "X-ray"}
    assert data["labels"] == {"background": 0, "foreground": 1}
    assert data["medalloy"]["modality"] == "X-ray"
    img, _ = read_any(out / "imagesTr" / "S_x_0000.png")
    assert img.shape == (1, 8, 10) and np.array_equal(img[0], _rgb(0)[..., 0])


def test_grey_default_channel_name(tmp_path: Path) -> None:
    images, masks = make_input(tmp_path / "in", ["x"], grey=True)
    out = tmp_path / "Dataset002_Cxr"
    import_folders(images, masks, out, source="S", progress=False)
    assert _json(out)["channel_names"] == {"0": "image"}


def test_multilabel_masks_are_kept(tmp_path: Path) -> None:
    images, masks = make_input(tmp_path / "in", ["a", "b"], values=(0, 1, 2))
    out = tmp_path / "Dataset003_M"
    import_folders(images, masks, out, source="s", labels={"lung": 1, "heart": 2}, progress=False)
    lab = np.asarray(Image.open(out / "labelsTr" / "s_a.png"))
    assert np.array_equal(lab, _mask(0, values=(0, 1, 2)))
    assert _json(out)["labels"] == {"background": 0, "lung": 1, "heart": 2}


def test_jpeg_images_and_masks_are_thresholded(tmp_path: Path) -> None:
    images, masks = make_input(tmp_path / "in", ["a"], img_ext=".jpg", mask_ext=".jpg")
    raw_mask = np.asarray(Image.open(masks / "a.jpg"))
    assert len(np.unique(raw_mask)) > 2  # JPEG noise: values in between 0 and 255
    out = tmp_path / "Dataset004_J"
    import_folders(images, masks, out, source="s", labels={"polyp": 1}, progress=False)
    lab = np.asarray(Image.open(out / "labelsTr" / "s_a.png"))
    assert np.array_equal(lab, (raw_mask > 127).astype(np.uint8))
    img = np.asarray(Image.open(out / "imagesTr" / "s_a_0000.png"))
    assert np.array_equal(img, np.asarray(Image.open(images / "a.jpg")))  # decoded pixels, stored lossless


def test_convert_mask_rules() -> None:
    p = Path("m.png")
    labels = {"background": 0, "x": 3}
    assert np.array_equal(convert_mask(np.array([[[0, 255, 255]]]), p, labels), [[0, 3, 3]])
    assert np.array_equal(convert_mask(np.array([[[0, 3, 0]]]), p, labels), [[0, 3, 0]])
    with pytest.raises(MedalloyError, match=r"m\.png: mask values \[0, 1, 3\] are not label values"):
        convert_mask(np.array([[[0, 1, 3]]]), p, labels)
    with pytest.raises(MedalloyError, match="one foreground label"):
        convert_mask(np.array([[[0, 255]]]), p, {"background": 0, "a": 1, "b": 2})
    rgb = np.repeat(np.array([[[0, 255]]]), 3, axis=0)
    assert np.array_equal(convert_mask(rgb, p, labels), [[0, 3]])
    colour = np.array([[[0]], [[255]], [[0]]])
    with pytest.raises(MedalloyError, match="colour"):
        convert_mask(colour, p, labels)


def test_case_ids_are_sanitised() -> None:
    assert make_case_id("CVC", "12") == "CVC_12"
    assert make_case_id("my site", "a.b(c)") == "my-site_a-b-c-"
    assert make_case_id("CVC", "0001") == "CVC-0001"  # never ends in nnU-Net's _dddd channel suffix
    assert make_case_id("s", "x_1234") == "s_x-1234"


def test_sanitised_ids_round_trip(tmp_path: Path) -> None:
    images, masks = make_input(tmp_path / "in", ["0001", "a b"])
    out = tmp_path / "Dataset005_S"
    ds = import_folders(images, masks, out, source="s", progress=False)
    assert [c.case_id for c in ds.cases] == ["s-0001", "s_a-b"]
    assert all(c.label is not None for c in ds.cases)
    assert check_dataset(out, progress=False) == []


def test_second_source_adds_cases(tmp_path: Path) -> None:
    a_img, a_mask = make_input(tmp_path / "A", ["1", "2"])
    b_img, b_mask = make_input(tmp_path / "B", ["1", "2", "3"])
    out = tmp_path / "Dataset201_Polyp"
    import_folders(a_img, a_mask, out, source="Kvasir", labels={"polyp": 1}, progress=False)
    ds = import_folders(b_img, b_mask, out, source="CVC", labels={"polyp": 1}, progress=False)
    data = _json(out)
    assert data["numTraining"] == 5 and len(ds) == 5
    assert ds.sources == ["CVC", "Kvasir"]
    assert {c.case_id: c.source for c in ds.cases}["CVC_3"] == "CVC"
    assert check_dataset(out, progress=False) == []
    # labels=None on a later import uses the dataset's labels
    c_img, c_mask = make_input(tmp_path / "C", ["9"])
    import_folders(c_img, c_mask, out, source="Other", progress=False)
    assert _json(out)["labels"] == {"background": 0, "polyp": 1}


def test_same_source_needs_overwrite(tmp_path: Path) -> None:
    images, masks = make_input(tmp_path / "in", ["1", "2", "3"])
    out = tmp_path / "Dataset006_O"
    import_folders(images, masks, out, source="s", progress=False)
    before = (out / "imagesTr" / "s_1_0000.png").read_bytes()
    with pytest.raises(MedalloyError, match="source 's' is already imported.*overwrite"):
        import_folders(images, masks, out, source="s", progress=False)
    # overwrite re-imports; a case gone from the input is removed from the dataset
    (images / "3.png").unlink()
    (masks / "3.png").unlink()
    data = _json(out)
    data["medalloy"]["cases"]["s_1"]["patient"] = "P7"
    (out / "dataset.json").write_text(json.dumps(data), encoding="utf-8")
    ds = import_folders(images, masks, out, source="s", overwrite=True, progress=False)
    assert [c.case_id for c in ds.cases] == ["s_1", "s_2"]
    assert ds.case("s_1").patient == "P7"
    assert not (out / "imagesTr" / "s_3_0000.png").exists() and not (out / "labelsTr" / "s_3.png").exists()
    assert _json(out)["numTraining"] == 2 and (out / "imagesTr" / "s_1_0000.png").read_bytes() == before
    assert check_dataset(out, progress=False) == []


def test_existing_output_file_needs_overwrite(tmp_path: Path) -> None:
    images, masks = make_input(tmp_path / "in", ["1"])
    out = tmp_path / "Dataset007_F"
    (out / "labelsTr").mkdir(parents=True)
    (out / "labelsTr" / "s_1.png").write_bytes(b"left over")
    with pytest.raises(MedalloyError, match="already exist.*s_1.png"):
        import_folders(images, masks, out, source="s", progress=False)
    assert (out / "labelsTr" / "s_1.png").read_bytes() == b"left over"


@pytest.mark.parametrize("name", ["Polyp", "Dataset01_Polyp", "Dataset2011_Polyp", "dataset201_Polyp", "Dataset201"])
def test_bad_output_name(tmp_path: Path, name: str) -> None:
    images, masks = make_input(tmp_path / "in", ["1"])
    with pytest.raises(MedalloyError, match="DatasetNNN_Name") as exc:
        import_folders(images, masks, tmp_path / name, source="s", progress=False)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / name).exists()


def test_missing_and_orphan_masks(tmp_path: Path) -> None:
    images, masks = make_input(tmp_path / "in", ["a", "b", "c"])
    (masks / "b.png").unlink()
    out = tmp_path / "Dataset008_M"
    with pytest.raises(MedalloyError, match=r"1 image\(s\) have no mask.*b\.png"):
        import_folders(images, masks, out, source="s", progress=False)
    (images / "b.png").unlink()
    Image.fromarray(_mask(0)).save(masks / "zz.png")
    with pytest.raises(MedalloyError, match=r"mask\(s\) have no image.*zz\.png"):
        import_folders(images, masks, out, source="s", progress=False)
    assert not out.exists()


def test_size_mismatch(tmp_path: Path) -> None:
    images, masks = make_input(tmp_path / "in", ["a", "b"])
    Image.fromarray(_mask(0, size=(8, 9))).save(masks / "b.png")
    with pytest.raises(MedalloyError, match=r"b\.png: mask size 9x8 differs from image size 10x8"):
        import_folders(images, masks, tmp_path / "Dataset009_X", source="s", progress=False)
    assert not (tmp_path / "Dataset009_X").exists()


def test_unreadable_files_are_all_listed(tmp_path: Path) -> None:
    images, masks = make_input(tmp_path / "in", ["a", "b", "c"])
    (images / "a.png").write_bytes(b"junk")
    (masks / "c.png").write_bytes(b"")
    with pytest.raises(MedalloyError, match=r"2 input file\(s\) cannot be imported.*a\.png.*c\.png") as exc:
        import_folders(images, masks, tmp_path / "Dataset010_X", source="s", progress=False)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "Dataset010_X").exists()


def test_bad_mask_values(tmp_path: Path) -> None:
    images, masks = make_input(tmp_path / "in", ["a", "b"])
    Image.fromarray(_mask(0, values=(0, 7, 9))).save(masks / "a.png")
    with pytest.raises(MedalloyError, match=r"a\.png: mask values \[0, 7, 9\]"):
        import_folders(images, masks, tmp_path / "Dataset011_X", source="s", progress=False)


def test_empty_and_missing_folders(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("no images here", encoding="utf-8")
    with pytest.raises(MedalloyError, match="no PNG/JPG images found"):
        import_folders(tmp_path / "images", tmp_path / "masks", tmp_path / "Dataset012_X", source="s", progress=False)
    Image.fromarray(_rgb(0)).save(tmp_path / "images" / "a.png")
    with pytest.raises(MedalloyError, match="no PNG/JPG masks found"):
        import_folders(tmp_path / "images", tmp_path / "masks", tmp_path / "Dataset012_X", source="s", progress=False)
    with pytest.raises(MedalloyError, match="masks folder not found"):
        import_folders(tmp_path / "images", tmp_path / "nope", tmp_path / "Dataset012_X", source="s", progress=False)


def test_duplicate_stems_and_case_collisions(tmp_path: Path) -> None:
    images, masks = make_input(tmp_path / "in", ["a", "A"])
    with pytest.raises(MedalloyError, match="same case id"):
        import_folders(images, masks, tmp_path / "Dataset013_X", source="s", progress=False)
    images2, masks2 = make_input(tmp_path / "in2", ["a"])
    Image.fromarray(_rgb(5)).save(images2 / "a.jpg")
    with pytest.raises(MedalloyError, match="a.jpg and a.png|a.png and a.jpg"):
        import_folders(images2, masks2, tmp_path / "Dataset013_X", source="s", progress=False)


def test_mixed_grey_and_rgb_in_one_import(tmp_path: Path) -> None:
    images, masks = make_input(tmp_path / "in", ["a", "b"])
    Image.fromarray(_rgb(0)[..., 0]).save(images / "b.png")
    with pytest.raises(MedalloyError, match="1 grey and 1 RGB"):
        import_folders(images, masks, tmp_path / "Dataset014_X", source="s", progress=False)


def test_channel_mismatch_with_existing_dataset(tmp_path: Path) -> None:
    rgb_img, rgb_mask = make_input(tmp_path / "A", ["a"])
    grey_img, grey_mask = make_input(tmp_path / "B", ["b"], grey=True)
    out = tmp_path / "Dataset015_X"
    import_folders(rgb_img, rgb_mask, out, source="A", progress=False)
    before = (out / "dataset.json").read_text(encoding="utf-8")
    with pytest.raises(MedalloyError, match="dataset holds RGB images but these are grey"):
        import_folders(grey_img, grey_mask, out, source="B", progress=False)
    assert (out / "dataset.json").read_text(encoding="utf-8") == before and not (out / "imagesTr" / "B_b_0000.png").exists()


def test_label_map_conflicts(tmp_path: Path) -> None:
    a_img, a_mask = make_input(tmp_path / "A", ["a"])
    b_img, b_mask = make_input(tmp_path / "B", ["b"])
    out = tmp_path / "Dataset016_X"
    import_folders(a_img, a_mask, out, source="A", labels={"polyp": 1}, progress=False)
    with pytest.raises(MedalloyError, match="value 1 is 'polyp' in the dataset but 'tumour' here"):
        import_folders(b_img, b_mask, out, source="B", labels={"tumour": 1}, progress=False)
    with pytest.raises(MedalloyError, match="label 'polyp' is 1 in the dataset but 2 here"):
        import_folders(b_img, b_mask, out, source="B", labels={"polyp": 2}, progress=False)
    with pytest.raises(MedalloyError, match="not consecutive"):
        import_folders(b_img, b_mask, tmp_path / "Dataset017_Y", source="B", labels={"polyp": 2}, progress=False)
    # a compatible new label extends the map; this source's 0/255 masks map to its own label
    ds = import_folders(b_img, b_mask, out, source="B", labels={"tumour": 2}, progress=False)
    assert ds.spec.labels == {"background": 0, "polyp": 1, "tumour": 2}
    assert set(np.unique(np.asarray(Image.open(out / "labelsTr" / "B_b.png")))) == {0, 2}


@pytest.mark.realdata
def test_real_polyp_subset_imports_cleanly(shared_data: Path, tmp_path: Path) -> None:
    """Twelve real Kvasir and CVC cases (JPEG images, PNG masks) import into one clean dataset."""
    out = tmp_path / "Dataset201_Polyp"
    for folder, source in (("Kvasir-SEG", "Kvasir"), ("CVC-ClinicDB", "CVC")):
        src = shared_data / "Polyp" / folder
        if not src.is_dir():
            pytest.skip(f"{src} not found")
        sub = tmp_path / source
        (sub / "images").mkdir(parents=True)
        (sub / "masks").mkdir()
        for img in sorted((src / "images").glob("*.jpg"))[:6]:
            (sub / "images" / img.name).symlink_to(img)
            mask = src / "masks" / f"{img.stem}.png"
            (sub / "masks" / mask.name).symlink_to(mask)
        import_folders(sub / "images", sub / "masks", out, source=source, labels={"polyp": 1}, progress=False)
    ds = RawDataset(out)
    assert len(ds) == 12 and ds.sources == ["CVC", "Kvasir"] and ds.spec.is_rgb
    assert check_dataset(out, progress=False) == []
