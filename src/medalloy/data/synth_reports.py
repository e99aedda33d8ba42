"""Synthetic chest X-rays paired with reports that describe them (``SynthCXRText``).

A stand-in for image-report data (IU X-ray, MIMIC-CXR) on which pretraining can be tested end to
end: the report's text is derived from what was drawn into the image, so zero-shot classification,
retrieval and captioning are learnable. Each case is the anatomy of :mod:`medalloy.data.synth`'s
chest radiographs plus one of :data:`CLASSES`:

- ``No Finding``: the anatomy alone;
- ``Cardiomegaly``: the heart's radii scaled by 1.3-1.42 (a clearly larger cardiac silhouette);
- ``Effusion``: a dense band (fluid, with a meniscus rising laterally) filling the lower part of
  one lung, ``small`` (about the lowest fifth) or ``moderate`` (about the lowest two fifths);
- ``Pneumonia``: a bright patchy opacity in one lung zone (``upper`` or ``lower`` lobe).

Sides in the text are the patient's, as in radiology: image-left is the patient's right. Every
case is drawn from its own generators, seeded by ``SeedSequence([seed, 905, role, index])``
(roles: class block, patient anatomy, acquisition, pathology, text), so one case can be rendered
alone (:func:`render_report_case`) and equals the written one. Classes are balanced in every block
of four consecutive cases; cases ``2k`` and ``2k+1`` are two studies of patient ``p{k:04d}`` (the
same anatomy, each its own acquisition and finding).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from medalloy.data.io import write_image
from medalloy.data.synth import (
    _cxr_anatomy,
    _cxr_density,
    _ellipse_level,
    _grid2d,
    _make_bar,
    _refuse_existing,
    _smooth_noise,
    _soft,
    _to_uint8,
)
from medalloy.errors import MedalloyError
from medalloy.jsonio import atomic_folder

CLASSES = ("No Finding", "Cardiomegaly", "Effusion", "Pneumonia")
DATASET_ID = 905
FOLDER_NAME = "SynthCXRText"
PAIRS_COLUMNS = ("image", "patient", "finding", "findings", "impression")
REPORTS_COLUMNS = ("uid", "findings", "impression")
_CLASS, _PATIENT, _SCAN, _PATHOLOGY, _TEXT, _TEXT_ONLY = range(6)  # seed roles

# acquisition: one site, siteA-like (linear contrast, low noise), with per-case jitter
_GAMMA, _SCALE, _OFFSET, _NOISE, _BLUR = 1.0, 0.9, 0.04, 0.02, 0.6


def _rng(seed: int, role: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, DATASET_ID, role, index]))


@dataclass(frozen=True)
class _Pathology:
    """What a case's finding looks like, drawn for every case whatever its class (so a class can be swapped)."""

    side: str  # the patient's "right" (image-left) or "left"
    zone: str  # "upper" | "lower" (pneumonia)
    size: str  # "small" | "moderate" (effusion)
    heart_scale: float
    fluid_top: float  # effusion: the fluid's top at the lung's medial part (v, -1 top .. 1 bottom)
    blob: tuple[float, float, float, float]  # pneumonia: centre shift (u, v) from the zone's centre, and radii (normalised units)


def _draw_pathology(rng: np.random.Generator) -> _Pathology:
    side = ("right", "left")[int(rng.integers(2))]
    zone = ("upper", "lower")[int(rng.integers(2))]
    size = ("small", "moderate")[int(rng.integers(2))]
    heart_scale = float(rng.uniform(1.30, 1.42))
    fluid_top = float(rng.uniform(0.20, 0.26) if size == "small" else rng.uniform(-0.02, 0.06))
    blob = (float(rng.uniform(-0.03, 0.03)), float(rng.uniform(-0.03, 0.03)), float(rng.uniform(0.12, 0.16)), float(rng.uniform(0.14, 0.19)))
    return _Pathology(side, zone, size, heart_scale, fluid_top, blob)


def _case_class(seed: int, index: int) -> str:
    """Every block of four consecutive cases holds each class once, in its own random order."""
    order = _rng(seed, _CLASS, index // 4).permutation(len(CLASSES))
    return CLASSES[int(order[index % 4])]


# ------------------------------------------------------------------------------------------------
# Report text
# ------------------------------------------------------------------------------------------------
_HEART_NORMAL = (
    "Heart size is normal.",
    "The heart is normal in size.",
    "The cardiac silhouette is within normal limits.",
    "Normal cardiomediastinal silhouette.",
)
_HEART_ENLARGED = ("The heart is enlarged.", "The cardiac silhouette is enlarged.", "Cardiomegaly is present.", "Enlarged cardiac silhouette.")
_LUNGS_CLEAR = ("Lungs are clear.", "The lungs are clear.", "No focal consolidation.", "No focal airspace opacity.")
_LUNGS_OTHERWISE = ("The lungs are otherwise clear.", "No focal consolidation.", "No airspace opacity.")
_NO_EFFUSION = ("No pleural effusion.", "There is no pleural effusion.", "No pleural effusion is seen.")
_EXTRA = ("No pneumothorax.", "There is no pneumothorax.", "The osseous structures are intact.", "No acute osseous abnormality.")
_EFFUSION = (
    "{Size} {side} pleural effusion.",
    "There is a {size} {side} pleural effusion.",
    "Blunting of the {side} costophrenic angle with a {size} pleural effusion.",
    "{Size} amount of fluid at the {side} lung base, consistent with pleural effusion.",
)
_PNEUMONIA = (
    "Patchy opacity in the {side} {zone} lobe.",
    "There is patchy airspace opacity in the {side} {zone} lobe.",
    "Focal consolidation in the {side} {zone} lobe.",
    "{Side} {zone} lobe airspace opacity.",
)
_IMPRESSION = {
    "No Finding": ("No acute cardiopulmonary abnormality.", "No acute cardiopulmonary process.", "Normal chest radiograph."),
    "Cardiomegaly": ("Cardiomegaly.", "Cardiomegaly without acute pulmonary abnormality.", "Enlarged heart."),
    "Effusion": ("{Size} {side} pleural effusion.", "{Side} pleural effusion."),
    "Pneumonia": ("{Side} {zone} lobe pneumonia.", "{Side} {zone} lobe opacity, concerning for pneumonia.", "Pneumonia in the {side} {zone} lobe."),
}


def _describe(finding: str, p: _Pathology, rng: np.random.Generator) -> tuple[str, str]:
    """(findings, impression): 2-4 sentences naming the finding (side, zone, size) and some normal ones."""

    def pick(options: tuple[str, ...]) -> str:
        return options[int(rng.integers(len(options)))]

    words = {"side": p.side, "Side": p.side.capitalize(), "zone": p.zone, "size": p.size, "Size": p.size.capitalize()}
    if finding == "No Finding":
        main, others = [pick(_HEART_NORMAL)], [pick(_LUNGS_CLEAR), pick(_NO_EFFUSION), pick(_EXTRA)]
    elif finding == "Cardiomegaly":
        main, others = [pick(_HEART_ENLARGED)], [pick(_LUNGS_CLEAR), pick(_NO_EFFUSION), pick(_EXTRA)]
    elif finding == "Effusion":
        main, others = [pick(_EFFUSION).format(**words)], [pick(_HEART_NORMAL), pick(_LUNGS_OTHERWISE), pick(_EXTRA[:2])]
    elif finding == "Pneumonia":
        main, others = [pick(_PNEUMONIA).format(**words)], [pick(_HEART_NORMAL), pick(_NO_EFFUSION), pick(_EXTRA)]
    else:
        raise MedalloyError(f"unknown finding '{finding}'", fix=f"choose one of {', '.join(CLASSES)}")
    n_others = int(rng.integers(max(2 - len(main), 1), min(len(others), 4 - len(main)) + 1))
    chosen = [others[i] for i in rng.permutation(len(others))[:n_others]]
    if finding != "No Finding" and rng.uniform() < 0.75:  # the abnormal finding usually comes first
        sentences = main + chosen
    else:
        sentences = [(main + chosen)[i] for i in rng.permutation(len(main) + len(chosen))]
    return " ".join(sentences), pick(_IMPRESSION[finding]).format(**words)


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------
def _check_int(what: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise MedalloyError(f"{what} must be an integer >= {low}, got {value!r}", fix=f"pass a valid {what}")


def _zone_centre(mask: np.ndarray, u: np.ndarray, v: np.ndarray, zone: str) -> tuple[float, float]:
    """The deepest point (u, v) of one lung's air-filled part ``mask`` within its upper or lower 40 % of rows
    (the lower zone's air lies lateral to the heart on the left)."""
    rows = np.flatnonzero(mask.any(axis=1))
    top, bottom = rows[0], rows[-1] + 1
    cut = int(round(0.4 * (bottom - top)))
    band = np.zeros_like(mask)
    if zone == "upper":
        band[top : top + cut] = True
    else:
        band[bottom - cut : bottom] = True
    depth = ndi.distance_transform_edt(mask & band)
    r, c = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return float(u[r, c]), float(v[r, c])


def _render(index: int, seed: int, size: int, finding: str | None = None) -> tuple[np.ndarray, dict]:
    """One case; ``finding`` overrides the drawn class (the anatomy, acquisition and text draws stay the same)."""
    drawn = _case_class(seed, index)
    finding = drawn if finding is None else finding
    if finding not in CLASSES:
        raise MedalloyError(f"unknown finding '{finding}'", fix=f"choose one of {', '.join(CLASSES)}")
    n = size
    path_rng = _rng(seed, _PATHOLOGY, index)
    p = _draw_pathology(path_rng)
    patch = _smooth_noise(path_rng, (n, n), n / 40)  # the opacity's patchy texture
    edge = _smooth_noise(path_rng, (n, n), n / 16)  # and its irregular outline

    an = _cxr_anatomy(_rng(seed, _PATIENT, index // 2), n, 1.0, heart_scale=p.heart_scale if finding == "Cardiomegaly" else 1.0)
    d = _cxr_density(an)
    v, u = _grid2d(n)
    w = float(an["pixel"]) * 0.7
    lung = _soft(an["lung"], w) * (1.0 - _soft(an["heart"], w)) * _soft(an["body"], 2 * w)  # air-filled lung, as in _cxr_density
    sign = -1.0 if p.side == "right" else 1.0
    this_side = _soft(-sign * u, 0.02)
    if finding == "Effusion":
        top = p.fluid_top - 0.35 * np.clip(np.abs(u) - 0.3, 0.0, None)  # the meniscus rises laterally
        d = d + 0.38 * _soft(top - v, 0.02) * this_side * lung
    elif finding == "Pneumonia":
        cu, cv = _zone_centre(lung * this_side > 0.5, u, v, p.zone)
        du, dv, ru, rv = p.blob
        cu, cv = cu + du, cv + dv
        level = _ellipse_level(u - cu, v - cv, ru, rv) + 0.03 * np.clip(edge, -1.5, 1.5)
        d = d + 0.36 * _soft(level, 0.03) * np.clip(0.75 + 0.25 * patch, 0.3, 1.0) * this_side * lung
    d = np.clip(d, 0.0, 1.0)

    scan = _rng(seed, _SCAN, index)
    gamma = _GAMMA * math.exp(scan.normal(0.0, 0.05))
    x = _OFFSET + _SCALE * math.exp(scan.normal(0.0, 0.04)) * d**gamma
    x = ndi.gaussian_filter(x, _BLUR * n / 128, mode="nearest")
    x = x + _NOISE * np.sqrt(np.clip(x, 0, None) + 0.1) * scan.standard_normal(x.shape)
    image = _to_uint8(x)[None]

    findings, impression = _describe(finding, p, _rng(seed, _TEXT, index))
    info = {
        "finding": finding,
        "findings": findings,
        "impression": impression,
        "patient": f"p{index // 2:04d}",
        "side": p.side if finding in ("Effusion", "Pneumonia") else None,
        "zone": p.zone if finding == "Pneumonia" else None,
        "size": p.size if finding == "Effusion" else None,
    }
    return image, info


def render_report_case(index: int, seed: int = 0, size: int = 128, *, finding: str | None = None) -> tuple[np.ndarray, dict]:
    """Render case ``index`` alone, exactly as :func:`generate_report_pairs` writes it.

    Returns the image, uint8 ``(1, size, size)``, and ``{"finding": class, "findings", "impression",
    "patient", "side": "right"|"left"|None, "zone": "upper"|"lower"|None, "size": "small"|"moderate"|None}``
    (side and zone for Pneumonia, side and size for Effusion; sides are the patient's).
    ``finding`` replaces the case's class, all else equal (the same anatomy, acquisition and noise):
    the difference from ``finding="No Finding"`` is the pathology alone.
    """
    _check_int("index", index, 0)
    _check_int("seed", seed, 0)
    _check_int("size", size, 32)
    return _render(int(index), int(seed), int(size), finding)


def text_only_report(index: int, seed: int = 0) -> dict:
    """Text-only row ``index`` of ``reports.csv``: ``{"uid", "finding", "findings", "impression"}``, from its own seed."""
    _check_int("index", index, 0)
    _check_int("seed", seed, 0)
    rng = _rng(seed, _TEXT_ONLY, index)
    finding = CLASSES[int(rng.integers(len(CLASSES)))]
    findings, impression = _describe(finding, _draw_pathology(rng), rng)
    return {"uid": f"r{index:05d}", "finding": finding, "findings": findings, "impression": impression}


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def generate_report_pairs(
    out: str | Path,
    n_cases: int = 120,
    seed: int = 0,
    size: int = 128,
    text_only: int = 200,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write ``out/SynthCXRText`` and return that folder.

    ``images/case0000.png`` ... (``n_cases`` images), ``pairs.csv`` (image, patient, finding,
    findings, impression; image paths relative to the CSV) and ``reports.csv`` (uid, findings,
    impression: ``text_only`` rows without images, for summarisation). The folder is built under a
    temporary name and renamed when complete; a non-empty existing one is replaced only with ``overwrite``.
    """
    _check_int("n_cases", n_cases, 1)
    _check_int("seed", seed, 0)
    _check_int("size", size, 32)
    _check_int("text_only", text_only, 0)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MedalloyError("output path is a file", out, "give a folder to write the dataset into")
    target = out / FOLDER_NAME
    _refuse_existing(target, overwrite)
    bar = _make_bar(n_cases, progress, "synthetic image-report pairs")
    try:
        with atomic_folder(target) as tmp:
            rows = []
            for i in range(n_cases):
                image, info = _render(i, int(seed), int(size))
                name = f"images/case{i:04d}.png"
                write_image(tmp / name, image)
                rows.append({"image": name, **info})
                bar.update(1)
            _write_csv(tmp / "pairs.csv", PAIRS_COLUMNS, rows)
            _write_csv(tmp / "reports.csv", REPORTS_COLUMNS, [text_only_report(j, int(seed)) for j in range(text_only)])
    finally:
        bar.close()
    return target
