"""Built-in synthetic multi-site datasets, written as nnU-Net v2 raw folders.

The collection is a small stand-in for real multi-centre data, made so that every medalloy feature
(multi-dataset training, partially overlapping label sets, per-source evaluation) can be shown on a
laptop in minutes:

- ``Dataset901_SynthMR``: 3D MR-like volumes (NIfTI), organ + core, sites ``siteA``/``siteB``
  (siteB: thick 2 mm slices, other contrast, more noise and bias); two scans per patient;
- ``Dataset902_SynthCXR``: chest-X-ray-like PNGs, lung + heart, sites ``siteA``/``siteB``;
- ``Dataset903_SynthCXRLung``: the same anatomy from sites ``siteC``/``siteD``, lung labelled only
  (the heart is visible but unlabelled, as in JSRT vs Shenzhen);
- ``Dataset904_SynthEndo``: endoscopy-like RGB PNGs with one polyp-like lesion, sites ``siteA``/``siteB``.

Every case is drawn from its own ``numpy.random.Generator`` seeded by
``SeedSequence([seed, dataset_id, site_index, split, role, index])``, so one case can be rendered
alone (:func:`render_case`) and equals the written one; the test split does not depend on the
number of training cases. Anatomy is described by signed-distance-like level sets (negative
inside); labels are ``level < 0`` and images use a soft edge of the same level set, so a label
boundary is the image's 50 % iso-contour before blur.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from medalloy.data.dataset import make_dataset_json
from medalloy.data.io import ImageMeta, file_ending, write_image, write_label
from medalloy.errors import MedalloyError
from medalloy.jsonio import atomic_folder, atomic_path, write_json_atomic

SPLITS = {"train": 0, "test": 1}
_PATIENT, _SCAN = 0, 1  # seed roles: anatomy (shared by a patient's scans) vs acquisition


# ------------------------------------------------------------------------------------------------
# Descriptions of sites and datasets
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SiteShift:
    """Acquisition settings of one source (site); what makes its images differ from other sites'.

    Tissue values ``x`` in [0, 1] become ``offset + scale * x**gamma``; then a multiplicative bias
    (MR: ``exp(bias * field)``; X-ray: heel effect ``1 + bias * row``), Gaussian blur of ``blur``
    pixels (mm for MR), noise of std ``noise * scale`` and, for RGB, JPEG-like block quantisation
    with step ``jpeg`` (grey levels). ``fov`` zooms the X-ray anatomy or sets the endoscope's
    circular field-of-view radius; ``gains`` multiply R, G, B; ``vignette`` darkens by ``1 - v*r^2``.
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...] = (1.0, 1.0)
    gamma: float = 1.0
    scale: float = 1.0
    offset: float = 0.0
    noise: float = 0.02
    blur: float = 0.5
    bias: float = 0.0
    fov: float = 1.0
    gains: tuple[float, float, float] = (1.0, 1.0, 1.0)
    vignette: float = 0.0
    jpeg: float = 0.0
    note: str = ""


Renderer = Callable[[np.random.Generator, np.random.Generator, SiteShift], "tuple[np.ndarray, np.ndarray, ImageMeta | None]"]


@dataclass(frozen=True)
class SynthDataset:
    """One dataset of the collection: its nnU-Net fields, its sites and its renderer."""

    dataset_id: int
    short_name: str
    modality: str
    channel_names: dict[str, str]
    labels: dict[str, int]
    file_ending: str
    sites: dict[str, SiteShift]
    render: Renderer
    description: str
    scans_per_patient: int = 1

    @property
    def folder_name(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.short_name}"


@dataclass(frozen=True)
class _CaseSpec:
    case_id: str
    source: str
    site_index: int
    split: str
    index: int  # within (source, split)
    patient_index: int  # within (source, split)

    @property
    def patient_id(self) -> str:
        return f"{self.source}_{'tr' if self.split == 'train' else 'ts'}_p{self.patient_index:03d}"


# ------------------------------------------------------------------------------------------------
# Small numerical helpers (all vectorised)
# ------------------------------------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma: float | Sequence[float]) -> np.ndarray:
    """White noise low-passed by a Gaussian of ``sigma`` pixels, rescaled to mean 0, std 1."""
    field = ndi.gaussian_filter(rng.standard_normal(tuple(shape)), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-12)


def _soft(level: np.ndarray, width: float) -> np.ndarray:
    """Occupancy ``sigmoid(-level / width)``: 1 inside (level < 0), 0.5 on the boundary."""
    return 0.5 * (1.0 - np.tanh(level / (2.0 * width)))


def _grid2d(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(v, u)`` (rows, columns) of an ``n x n`` image, in [-1, 1]."""
    c = (np.arange(n) + 0.5) / n * 2.0 - 1.0
    v, u = np.meshgrid(c, c, indexing="ij")
    return v, u


def _rotate(u: np.ndarray, v: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates in a frame rotated by ``angle`` radians."""
    c, s = math.cos(angle), math.sin(angle)
    return c * u + s * v, -s * u + c * v


def _ellipse_level(a: np.ndarray, b: np.ndarray, ra: float, rb: float) -> np.ndarray:
    """Approximate signed distance to the ellipse ``(a/ra)^2 + (b/rb)^2 = 1`` (exact for circles)."""
    return (np.sqrt((a / ra) ** 2 + (b / rb) ** 2) - 1.0) * min(ra, rb)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# 901: MR-like 3D volumes
# ------------------------------------------------------------------------------------------------
MR_GRID = (40, 48, 32)  # fine 1 mm grid every site is rendered on before its own sampling


def _mr_coords() -> np.ndarray:
    """World coordinates in mm of the fine grid's voxel centres, shape ``(3, *MR_GRID)``, centred at 0."""
    axes = [np.arange(n) - (n - 1) / 2.0 for n in MR_GRID]
    return np.stack(np.meshgrid(*axes, indexing="ij"))


def _rotation(about_z: float, about_x: float) -> np.ndarray:
    cz, sz, cx, sx = math.cos(about_z), math.sin(about_z), math.cos(about_x), math.sin(about_x)
    rz = np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
    return rz @ rx


def _ellipsoid_level(p: np.ndarray, centre: np.ndarray, radii: np.ndarray, rot: np.ndarray, disp: np.ndarray) -> np.ndarray:
    """Signed distance (mm, approximate) to a rotated ellipsoid whose frame is warped by ``disp``."""
    q = np.einsum("ij,j...->i...", rot.T, p - centre[:, None, None, None]) + disp
    norm = np.sqrt(sum((q[i] / radii[i]) ** 2 for i in range(3)))
    return (norm - 1.0) * float(radii.min())


def _place_outside(rng: np.random.Generator, taken: list[tuple[np.ndarray, float]], radius: float, body: tuple[float, float], z_range: float) -> np.ndarray:
    """A centre for a sphere of ``radius`` inside the body ellipse that keeps clear of ``taken`` spheres.

    Draws 64 candidates at once and keeps the first that fits; falls back to the one with most room.
    """
    ang = rng.uniform(0, 2 * np.pi, 64)
    rad = np.sqrt(rng.uniform(0.0, 1.0, 64))
    margin = radius + 2.5
    cand = np.stack([rad * np.cos(ang) * (body[0] - margin), rad * np.sin(ang) * (body[1] - margin), rng.uniform(-z_range, z_range, 64)], axis=1)
    room = np.full(64, np.inf)
    for centre, r in taken:
        room = np.minimum(room, np.linalg.norm(cand - centre, axis=1) - r - radius - 1.5)
    ok = np.flatnonzero(room > 0)
    return cand[ok[0]] if ok.size else cand[int(np.argmax(room))]


def _mr_anatomy(patient: np.random.Generator, scan: np.random.Generator) -> dict:
    """Level sets (mm, negative inside) and textures of one MR scan on the fine grid.

    The patient generator draws the anatomy; the scan generator a small rigid shift between a
    patient's two scans (repositioning), so both scans show the same organ slightly moved.
    """
    p = _mr_coords()
    shift = scan.uniform(-1.5, 1.5, 3)
    p_in = p - shift[:, None, None, None]

    body = (patient.uniform(17.0, 18.8), patient.uniform(20.0, 22.5))
    taper = 1.0 - 0.06 * (p[2] / 16.0) ** 2  # body narrows a little towards both ends
    body_level = _ellipse_level(p[0], p[1], body[0], body[1]) + (1.0 - taper) * body[0]

    organ_c = np.array([patient.uniform(-6.0, -3.0), patient.uniform(-3.0, 3.0), patient.uniform(-2.0, 2.0)])
    organ_r = np.array([patient.uniform(8.5, 10.5), patient.uniform(10.0, 12.5), patient.uniform(7.0, 9.0)])
    organ_rot = _rotation(patient.uniform(-0.6, 0.6), patient.uniform(-0.2, 0.2))
    warp = np.stack([_smooth_noise(patient, MR_GRID, 6.0) for _ in range(3)]) * 1.8  # low-frequency deformation
    organ = _ellipsoid_level(p_in, organ_c, organ_r, organ_rot, warp)

    core_c = organ_c + organ_rot @ (organ_r * patient.uniform(-0.18, 0.18, 3))
    core_r = organ_r * patient.uniform(0.5, 0.6, 3)
    core_warp = np.stack([_smooth_noise(patient, MR_GRID, 4.0) for _ in range(3)]) * 0.8
    core = _ellipsoid_level(p_in, core_c, core_r, _rotation(patient.uniform(0, np.pi), 0.0), core_warp)
    core = np.maximum(core, organ + 2.5)  # the core keeps >= 2.5 mm of organ around it, even across thick slices

    taken = [(organ_c, float(organ_r.max()) + 2.0)]
    vessel_r = patient.uniform(1.8, 2.6)
    vessel_c = _place_outside(patient, taken, vessel_r + 1.0, body, 0.0)
    taken.append((vessel_c * np.array([1, 1, 0]), vessel_r + 1.0))
    tilt = patient.uniform(-0.15, 0.15, 2)
    vessel = np.hypot(p_in[0] - vessel_c[0] - tilt[0] * p_in[2], p_in[1] - vessel_c[1] - tilt[1] * p_in[2]) - vessel_r

    blobs = []
    for value, lo, hi in ((0.82, 3.5, 5.0), (0.16, 2.5, 4.0)):  # a bright nodule and a dark cyst
        r = patient.uniform(lo, hi)
        c = _place_outside(patient, taken, r, body, 8.0)
        taken.append((c, r))
        blobs.append((value, np.linalg.norm(p_in - c[:, None, None, None], axis=0) - r))

    return {
        "body": body_level,
        "organ": organ,
        "core": core,
        "vessel": vessel,
        "blobs": blobs,  # [(tissue value, level set)]
        "texture": _smooth_noise(patient, MR_GRID, 1.2),
        "texture_low": _smooth_noise(patient, MR_GRID, 5.0),
    }


def _mr_tissue(an: dict) -> np.ndarray:
    """Tissue values in [0, 1] (a T1-like contrast): fat rim bright, organ mid-grey, core dark."""
    w = 0.5  # mm: partial-volume width of every edge
    body = _soft(an["body"], w)
    fat = body * (1.0 - _soft(an["body"] + 2.2, w))
    tex, low = an["texture"], an["texture_low"]
    t = body * (0.30 + 0.035 * tex + 0.03 * low)
    t = t * (1 - fat) + fat * (0.86 + 0.03 * tex)
    for value, level in an["blobs"]:
        occ = _soft(level, w) * body
        t = t * (1 - occ) + occ * (value + 0.02 * tex)
    vessel = _soft(an["vessel"], w) * body
    t = t * (1 - vessel) + vessel * 0.95
    organ = _soft(an["organ"], w)
    t = t * (1 - organ) + organ * (0.62 + 0.025 * tex + 0.02 * low)
    core = _soft(an["core"], w)
    t = t * (1 - core) + core * (0.18 + 0.025 * tex)
    return np.clip(t, 0.0, 1.0)


def _thick_slices(x: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor`` consecutive fine slices along the last axis (a thick slice's profile)."""
    if factor == 1:
        return x
    n = x.shape[-1] // factor * factor
    return x[..., :n].reshape(*x.shape[:-1], n // factor, factor).mean(-1)


def _render_mr(patient: np.random.Generator, scan: np.random.Generator, site: SiteShift) -> tuple[np.ndarray, np.ndarray, ImageMeta]:
    """One MR volume: int16 image ``(1, X, Y, Z)``, label ``(X, Y, Z)`` in {0, 1, 2}, NIfTI geometry.

    Signal ``s = (offset + scale * t**gamma) * exp(bias * B)`` with a smooth field ``B``, blurred,
    averaged over thick slices, then Rician noise ``sqrt((s + n1)^2 + n2^2)``, ``n ~ N(0, noise*scale)``.
    """
    an = _mr_anatomy(patient, scan)
    t = _mr_tissue(an)
    gamma = site.gamma * math.exp(scan.normal(0.0, 0.04))
    s = site.offset + site.scale * t**gamma
    s = s * np.exp(site.bias * _smooth_noise(scan, MR_GRID, 10.0))
    s = ndi.gaussian_filter(s, site.blur, mode="nearest")
    factor = int(round(site.spacing[2] / 1.0))
    s = _thick_slices(s, factor)
    sigma = site.noise * site.scale
    s = np.sqrt((s + scan.normal(0.0, sigma, s.shape)) ** 2 + scan.normal(0.0, sigma, s.shape) ** 2)
    image = np.clip(np.rint(s), 0, 32767).astype(np.int16)[None]

    # labels from the same level sets, averaged over each thick slice like the signal
    organ, core = _thick_slices(an["organ"], factor), _thick_slices(an["core"], factor)
    organ_mask = organ < 0
    # thick slices can bring the core next to the organ's edge; keep one voxel of organ around it
    core_mask = (core < 0) & ndi.binary_erosion(organ_mask)
    label = np.where(core_mask, 2, np.where(organ_mask, 1, 0)).astype(np.uint8)

    spacing = tuple(float(x) for x in site.spacing)
    affine = np.diag(list(spacing) + [1.0])
    # the centre of the first thick slice sits (factor - 1) / 2 fine voxels above the fine grid's
    affine[:3, 3] = [-(MR_GRID[i] - 1) / 2.0 + (factor - 1) / 2.0 * (i == 2) for i in range(3)]
    meta = ImageMeta(kind="nifti", shape=tuple(label.shape), spacing=spacing, affine=affine.tolist())
    return image, label, meta


# ------------------------------------------------------------------------------------------------
# 902 / 903: chest-X-ray-like 2D images
# ------------------------------------------------------------------------------------------------
def _cxr_anatomy(patient: np.random.Generator, n: int, zoom: float, heart_scale: float = 1.0) -> dict[str, np.ndarray]:
    """Level sets (normalised units, negative inside) and texture of one frontal chest radiograph.

    Image-left is the patient's right; the heart bulges to image-right as in a PA view.
    ``heart_scale`` multiplies the heart's radii (cardiomegaly); 1.0 leaves every draw and value unchanged.
    """
    v, u = _grid2d(n)
    z = zoom * patient.uniform(0.94, 1.04)
    u, v = _rotate((u - patient.uniform(-0.03, 0.03)) / z, (v - patient.uniform(-0.03, 0.03)) / z, patient.uniform(-0.05, 0.05))
    u = u + 0.02 * _smooth_noise(patient, (n, n), n / 5)
    v = v + 0.02 * _smooth_noise(patient, (n, n), n / 5)
    au = np.abs(u)

    neck = np.clip((-0.62 - v) / 0.3, 0.0, 1.0)  # shoulders slope into the neck at the top
    body = au - (patient.uniform(0.86, 0.94) + 0.05 * np.clip(v, -1, 1) - 0.45 * neck**0.7)
    mediastinum = au - (0.11 + 0.03 * np.clip(v, 0, 1))

    lungs = []
    for side in (-1.0, 1.0):
        cu = side * patient.uniform(0.42, 0.46)
        cv = patient.uniform(-0.1, -0.05)
        rv = patient.uniform(0.56, 0.62)
        ru0 = patient.uniform(0.30, 0.34) * (0.93 if side > 0 else 1.0)  # the left lung is smaller
        lateral, b = (u - cu) * side, v - cv
        depth = np.clip((b + rv) / (2 * rv), 0.0, 1.0)  # 0 at the apex, 1 at the base
        ru = ru0 * (0.55 + 0.45 * np.sqrt(depth))
        ell = (np.sqrt((lateral / ru) ** 2 + (b / rv) ** 2) - 1.0) * ru0
        dome = cv + 0.88 * rv - 0.12 * np.exp(-(((lateral + 0.04) / 0.2) ** 2))
        lungs.append(np.maximum(ell, v - dome))
    lung = np.minimum(*lungs)

    hc = (patient.uniform(0.06, 0.12), patient.uniform(0.11, 0.17))
    ha, hb = _rotate(u - hc[0], v - hc[1], patient.uniform(-0.5, -0.25))
    heart = _ellipse_level(ha, hb, patient.uniform(0.30, 0.35) * heart_scale, patient.uniform(0.22, 0.26) * heart_scale)

    # posterior ribs: arcs that rise from the spine and fall laterally, one every ~0.17
    rib_phase = v + 1.1 * au**2 - 0.75 * au
    spacing = patient.uniform(0.16, 0.19)
    ribs = np.clip((np.cos(2 * np.pi * rib_phase / spacing + patient.uniform(0, 2 * np.pi)) - 0.3) / 0.5, 0.0, 1.0)
    ribs = ribs * _soft(np.maximum(0.12 - au, au - 0.9), 0.03) * _soft(v - 0.5, 0.05)

    clav_y = -0.62 - 0.25 * (au - 0.1)  # clavicles rise laterally
    clavicle = np.maximum(np.abs(v - clav_y) - 0.03, np.maximum(0.1 - au, au - 0.66))

    bubble = _ellipse_level(u - 0.36, v - 0.68, 0.09, 0.06) if patient.uniform() < 0.6 else np.full_like(u, 1.0)
    hilum = np.exp(-(((au - 0.2) / 0.14) ** 2 + ((v + 0.02) / 0.25) ** 2))
    return {
        "body": body, "mediastinum": mediastinum, "lung": lung, "heart": heart, "ribs": ribs,
        "clavicle": clavicle, "bubble": bubble, "hilum": hilum,
        "texture": _smooth_noise(patient, (n, n), 0.9), "pixel": np.asarray(2.0 / n / z),
    }  # fmt: skip


def _cxr_density(an: dict) -> np.ndarray:
    """Projected density in [0, 1] (bright = dense): tissue, minus air in the lungs, plus bone."""
    w = float(an["pixel"]) * 0.7
    body = _soft(an["body"], 2 * w)
    heart = _soft(an["heart"], w)
    lung = _soft(an["lung"], w) * (1.0 - heart) * body
    d = 0.05 + 0.55 * body
    d += 0.15 * _soft(an["mediastinum"], 2 * w) * body
    d += 0.08 * heart * body
    d -= lung * (0.40 - 0.06 * an["hilum"] - 0.025 * an["texture"])
    d -= 0.22 * _soft(an["bubble"], w) * body * (1 - lung)
    d += an["ribs"] * body * (0.03 + 0.045 * lung)  # ribs show mostly against the air of the lungs
    d += 0.12 * _soft(an["clavicle"], w) * body
    return np.clip(d, 0.0, 1.0)


def _render_cxr(patient: np.random.Generator, scan: np.random.Generator, site: SiteShift, heart_label: bool = True) -> tuple[np.ndarray, np.ndarray, None]:
    """One radiograph: uint8 image ``(1, n, n)`` and label ``(n, n)`` (1 lung, 2 heart if labelled).

    Grey value ``clip(offset + scale * d**gamma) * (1 + bias * row)``, blurred, plus quantum-like
    noise of std ``noise * sqrt(value + 0.1)``. The heart over a lung is labelled heart (not lung).
    """
    n = site.shape[0]
    an = _cxr_anatomy(patient, n, site.fov)
    d = _cxr_density(an)
    gamma = site.gamma * math.exp(scan.normal(0.0, 0.05))
    x = site.offset + site.scale * math.exp(scan.normal(0.0, 0.04)) * d**gamma
    row = _grid2d(n)[0]
    x = x * (1.0 + site.bias * row)
    x = ndi.gaussian_filter(x, site.blur, mode="nearest")
    x = x + site.noise * np.sqrt(np.clip(x, 0, None) + 0.1) * scan.standard_normal(x.shape)
    image = _to_uint8(x)[None]

    inside = an["body"] < 0
    heart = (an["heart"] < 0) & inside
    lung = (an["lung"] < 0) & inside & ~heart
    label = np.where(lung, 1, 0)
    if heart_label:
        label = np.where(heart, 2, label)
    return image, label.astype(np.uint8), None


# ------------------------------------------------------------------------------------------------
# 904: endoscopy-like RGB images
# ------------------------------------------------------------------------------------------------
def _jpeg_like(rgb: np.ndarray, step: float) -> np.ndarray:
    """Quantise 8x8 block DCT coefficients of Y/Cb/Cr (values 0..255), like a low-quality JPEG.

    The step grows with spatial frequency (``step * (1 + (i + j) / 2)``) and is doubled for chroma.
    """
    if step <= 0:
        return rgb
    h, w, _ = rgb.shape
    m = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
    ycc = rgb @ m.T
    k = np.arange(8)
    dct = np.sqrt(2.0 / 8) * np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / 16)
    dct[0] /= np.sqrt(2.0)
    blocks = ycc.reshape(h // 8, 8, w // 8, 8, 3).transpose(0, 2, 4, 1, 3)
    coef = dct @ blocks @ dct.T
    q = step * (1.0 + (k[:, None] + k[None, :]) / 2.0)
    q = np.stack([q, 2 * q, 2 * q])[:, :, :]  # (3, 8, 8)
    coef = np.rint(coef / q) * q
    blocks = dct.T @ coef @ dct
    ycc = blocks.transpose(0, 3, 1, 4, 2).reshape(h, w, 3)
    return ycc @ np.linalg.inv(m).T


def _endo_scene(patient: np.random.Generator, n: int, fov: float) -> dict[str, np.ndarray]:
    """Mucosa height/colour fields and the lesion's level set (normalised units) of one frame."""
    v, u = _grid2d(n)
    px = 2.0 / n
    theta, freq = patient.uniform(0, np.pi), patient.uniform(0.9, 1.6)
    warp = 1.2 * _smooth_noise(patient, (n, n), n / 5)
    folds = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (u * math.cos(theta) + v * math.sin(theta)) + warp)
    height = 0.22 * folds + 0.10 * _smooth_noise(patient, (n, n), n / 10)

    area = patient.uniform(0.045, 0.12) * 4.0  # 4.5-12 % of the image (its area is 4 in these units)
    r_eq = math.sqrt(area / math.pi)
    aspect = patient.uniform(0.75, 1.33)
    ra, rb = r_eq * math.sqrt(aspect), r_eq / math.sqrt(aspect)
    reach = max(0.0, min(0.5, fov - 0.12 - 1.15 * max(ra, rb)))
    rho, phi = reach * math.sqrt(patient.uniform()), patient.uniform(0, 2 * np.pi)
    cu, cv = rho * math.cos(phi), rho * math.sin(phi)
    a, b = _rotate(u - cu, v - cv, patient.uniform(0, np.pi))
    a = a + 0.12 * r_eq * _smooth_noise(patient, (n, n), n / 8)
    b = b + 0.12 * r_eq * _smooth_noise(patient, (n, n), n / 8)
    norm = np.sqrt((a / ra) ** 2 + (b / rb) ** 2)
    lesion = (norm - 1.0) * min(ra, rb)
    occ = _soft(lesion, 0.7 * px)
    dome = np.sqrt(np.clip(1.0 - norm**2, 0.0, 1.0))
    height = height * (1 - occ) + occ * (0.25 + 0.5 * dome)

    away = -np.array([cu, cv]) / (rho + 1e-6) if rho > 0.1 else np.array([math.cos(phi + np.pi), math.sin(phi + np.pi)])
    lumen_c = away * patient.uniform(0.45, 0.65)
    lumen = np.exp(-((u - lumen_c[0]) ** 2 + (v - lumen_c[1]) ** 2) / (2 * patient.uniform(0.16, 0.22) ** 2))
    return {
        "u": u, "v": v, "px": np.asarray(px), "folds": folds, "height": height, "lesion": lesion, "occ": occ,
        "dome": dome, "lumen": lumen * (1 - occ),
        "redness": _smooth_noise(patient, (n, n), n / 7), "vessels": _smooth_noise(patient, (n, n), n / 18),
        "pits": _smooth_noise(patient, (n, n), 1.1), "glints": _smooth_noise(patient, (n, n), 0.9),
        "lesion_tint": patient.uniform(0.95, 1.05, 3),
    }  # fmt: skip


def _endo_colour(sc: dict) -> np.ndarray:
    """Linear RGB ``(n, n, 3)`` in [0, 1] before the site's camera: mucosa, lesion, shading, highlights."""
    occ = sc["occ"][..., None]
    mucosa = np.array([0.86, 0.50, 0.45]) * (1.0 + np.array([0.03, -0.10, -0.09]) * sc["redness"][..., None])
    vessel = np.exp(-((sc["vessels"] / 0.09) ** 2))[..., None] * 0.55
    mucosa = mucosa * (1.0 - vessel * np.array([0.15, 0.5, 0.45]))
    mucosa = mucosa * (1.0 + 0.03 * sc["pits"][..., None])
    lesion = np.array([0.95, 0.40, 0.36]) * sc["lesion_tint"] * (1.0 + np.array([0.04, 0.08, 0.08]) * sc["pits"][..., None])
    col = mucosa * (1 - occ) + lesion * occ

    gy, gx = np.gradient(sc["height"], float(sc["px"]))
    # co-axial endoscope light: surfaces facing the camera are bright, slopes darker
    shade = (1.0 + 0.12 * (gx + 0.5 * gy)) / np.sqrt(1.0 + 0.3 * (gx**2 + gy**2))
    col = col * np.clip(shade, 0.35, 1.25)[..., None]
    col = col * (1.0 - 0.8 * sc["lumen"])[..., None]

    glint = ((sc["glints"] > 2.4) & (sc["folds"] > 0.8)) | ((sc["glints"] > 1.4) & (sc["dome"] > 0.75))
    glint = np.clip(ndi.gaussian_filter(glint.astype(float), 0.5) * 2.0, 0.0, 1.0)[..., None]
    return col * (1 - glint) + glint * 0.98


def _render_endo(patient: np.random.Generator, scan: np.random.Generator, site: SiteShift) -> tuple[np.ndarray, np.ndarray, None]:
    """One endoscopy frame: uint8 RGB image ``(3, n, n)`` and lesion label ``(n, n)``.

    Camera model: ``(gains * scale * (1 - vignette * r^2) * rgb) ** gamma``, blur, noise, JPEG-like
    block quantisation, black outside the circular field of view of radius ``fov``.
    """
    n = site.shape[0]
    sc = _endo_scene(patient, n, site.fov)
    col = _endo_colour(sc)
    r2 = sc["u"] ** 2 + sc["v"] ** 2
    fov = _soft(np.sqrt(r2) - site.fov, float(sc["px"]))
    illum = site.scale * math.exp(scan.normal(0.0, 0.05)) * (1.0 - site.vignette * r2) * fov
    col = np.clip(col * np.asarray(site.gains) * illum[..., None], 0.0, 1.0) ** site.gamma
    col = ndi.gaussian_filter(col, (site.blur, site.blur, 0.0), mode="nearest")
    col = col + site.noise * scan.standard_normal(col.shape)
    col = _jpeg_like(np.clip(col, 0.0, 1.0) * 255.0, site.jpeg) / 255.0
    image = np.moveaxis(_to_uint8(col), -1, 0)
    label = ((sc["lesion"] < 0) & (np.sqrt(r2) < site.fov)).astype(np.uint8)
    return image, label, None


# ------------------------------------------------------------------------------------------------
# The collection
# ------------------------------------------------------------------------------------------------
COLLECTION: dict[str, SynthDataset] = {
    d.folder_name: d
    for d in (
        SynthDataset(
            dataset_id=901, short_name="SynthMR", modality="MR", channel_names={"0": "MR"},
            labels={"background": 0, "organ": 1, "core": 2}, file_ending=".nii.gz", render=_render_mr,
            scans_per_patient=2,
            description="Synthetic MR-like volumes: an irregular organ with a dark core, fat rim, vessel, nodule and cyst distractors.",
            sites={
                "siteA": SiteShift(shape=(40, 48, 32), spacing=(1.0, 1.0, 1.0), gamma=1.0, scale=1000.0, offset=0.0,
                                   noise=0.025, blur=0.4, bias=0.10, note="1 mm isotropic, linear contrast, low noise, mild bias"),
                "siteB": SiteShift(shape=(40, 48, 16), spacing=(1.0, 1.0, 2.0), gamma=0.6, scale=2500.0, offset=200.0,
                                   noise=0.04, blur=0.8, bias=0.20, note="2 mm thick slices, compressed contrast and offset, more noise, strong bias, blurrier"),
            },
        ),
        SynthDataset(
            dataset_id=902, short_name="SynthCXR", modality="XR", channel_names={"0": "XR"},
            labels={"background": 0, "lung": 1, "heart": 2}, file_ending=".png",
            render=partial(_render_cxr, heart_label=True),
            description="Synthetic frontal chest radiographs with lung and heart labels (JSRT-like).",
            sites={
                "siteA": SiteShift(shape=(96, 96), gamma=1.0, scale=0.92, offset=0.03, noise=0.02, blur=0.5, bias=0.0,
                                   fov=1.0, note="96x96, linear, low noise, sharp"),
                "siteB": SiteShift(shape=(128, 128), gamma=0.7, scale=0.80, offset=0.15, noise=0.035, blur=1.3, bias=0.08,
                                   fov=0.95, note="128x128, brighter washed-out contrast, more noise, blurrier, heel effect, anatomy 5 % smaller"),
            },
        ),
        SynthDataset(
            dataset_id=903, short_name="SynthCXRLung", modality="XR", channel_names={"0": "XR"},
            labels={"background": 0, "lung": 1}, file_ending=".png",
            render=partial(_render_cxr, heart_label=False),
            description="Synthetic chest radiographs from two other sites, lungs labelled only (Shenzhen-like); the heart is visible but unlabelled.",
            sites={
                "siteC": SiteShift(shape=(96, 96), gamma=1.5, scale=1.0, offset=0.0, noise=0.045, blur=0.8, bias=-0.10,
                                   fov=1.06, note="96x96, dark high-contrast curve, strong noise, reverse heel effect, anatomy 6 % larger"),
                "siteD": SiteShift(shape=(112, 112), gamma=1.0, scale=0.70, offset=0.12, noise=0.03, blur=0.6, bias=0.0,
                                   fov=0.9, note="112x112, low contrast, moderate noise, anatomy 10 % smaller"),
            },
        ),
        SynthDataset(
            dataset_id=904, short_name="SynthEndo", modality="endoscopy", channel_names={"0": "R", "1": "G", "2": "B"},
            labels={"background": 0, "lesion": 1}, file_ending=".png", render=_render_endo,
            description="Synthetic colonoscopy-like frames with one polyp-like lesion (Kvasir/CVC-like).",
            sites={
                "siteA": SiteShift(shape=(128, 128), gamma=0.9, scale=1.05, noise=0.015, blur=0.5, fov=1.12,
                                   gains=(1.0, 1.0, 1.0), vignette=0.25, jpeg=3.0, note="128x128, neutral colour, bright, light compression"),
                "siteB": SiteShift(shape=(96, 96), gamma=1.1, scale=0.95, noise=0.03, blur=1.0, fov=1.05,
                                   gains=(1.08, 0.86, 0.72), vignette=0.45, jpeg=9.0, note="96x96, orange cast, darker with strong vignetting, blurrier, heavy block artefacts"),
            },
        ),
    )
}  # fmt: skip

DATASET_NAMES = list(COLLECTION)


def get_dataset(name: str | int) -> SynthDataset:
    """The collection entry named by folder name (``Dataset902_SynthCXR``), short name or id (``902``)."""
    key = str(name).strip().lower()
    for d in COLLECTION.values():
        if key in (d.folder_name.lower(), d.short_name.lower(), str(d.dataset_id)):
            return d
    raise MedalloyError(f"unknown synthetic dataset '{name}'", fix=f"choose one of {', '.join(DATASET_NAMES)}")


def _check_counts(seed: int, cases_per_source: int, test_cases_per_source: int) -> None:
    for what, value, low in (("seed", seed, 0), ("cases_per_source", cases_per_source, 1), ("test_cases_per_source", test_cases_per_source, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise MedalloyError(f"{what} must be an integer >= {low}, got {value!r}", fix=f"pass a valid {what}")


def _case_specs(ds: SynthDataset, cases_per_source: int, test_cases_per_source: int) -> list[_CaseSpec]:
    """Every case to write: ids ``<site>_tr000`` / ``<site>_ts000``, patients grouped within a split."""
    specs = []
    for site_index, source in enumerate(ds.sites):
        for split, count in (("train", cases_per_source), ("test", test_cases_per_source)):
            tag = "tr" if split == "train" else "ts"
            for i in range(count):
                specs.append(_CaseSpec(f"{source}_{tag}{i:03d}", source, site_index, split, i, i // ds.scans_per_patient))
    return specs


def _generators(seed: int, ds: SynthDataset, spec: _CaseSpec) -> tuple[np.random.Generator, np.random.Generator]:
    """(anatomy, acquisition) generators; a patient's scans share the anatomy one."""
    base = [seed, ds.dataset_id, spec.site_index, SPLITS[spec.split]]
    patient = np.random.default_rng(np.random.SeedSequence(base + [_PATIENT, spec.patient_index]))
    scan = np.random.default_rng(np.random.SeedSequence(base + [_SCAN, spec.index]))
    return patient, scan


def render_case(name: str | int, source: str, index: int, seed: int = 0, split: str = "train") -> tuple[np.ndarray, np.ndarray, ImageMeta | None]:
    """Render one case alone, exactly as :func:`generate_dataset` writes it.

    Returns the image ``(C, *spatial)`` (uint8 for PNG, int16 for NIfTI), the label ``(*spatial)``
    (uint8) and the NIfTI geometry (``None`` for PNG).
    """
    ds = get_dataset(name)
    if source not in ds.sites:
        raise MedalloyError(f"{ds.folder_name} has no source '{source}'", fix=f"choose one of {', '.join(ds.sites)}")
    if split not in SPLITS:
        raise MedalloyError(f"unknown split '{split}'", fix="use 'train' or 'test'")
    _check_counts(seed, 1, 0)
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise MedalloyError(f"case index must be an integer >= 0, got {index!r}", fix="pass a valid index")
    spec = _CaseSpec("", source, list(ds.sites).index(source), split, index, index // ds.scans_per_patient)
    patient, scan = _generators(seed, ds, spec)
    return ds.render(patient, scan, ds.sites[source])


def _refuse_existing(target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite and (target.is_file() or any(target.iterdir())):
        raise MedalloyError("output exists and is not empty", target, "pass overwrite=True (--overwrite) or choose another output folder")


def _write_dataset(ds: SynthDataset, out: Path, seed: int, cases_per_source: int, test_cases_per_source: int, bar) -> Path:
    target = out / ds.folder_name
    with atomic_folder(target) as tmp:
        cases: dict[str, dict] = {}
        for spec in _case_specs(ds, cases_per_source, test_cases_per_source):
            patient, scan = _generators(seed, ds, spec)
            image, label, meta = ds.render(patient, scan, ds.sites[spec.source])
            images, labels = ("imagesTr", "labelsTr") if spec.split == "train" else ("imagesTs", "labelsTs")
            write_image(tmp / images / f"{spec.case_id}_0000{ds.file_ending}", image, meta)
            write_label(tmp / labels / f"{spec.case_id}{ds.file_ending}", label, meta)
            cases[spec.case_id] = {"source": spec.source}
            if ds.scans_per_patient > 1:
                cases[spec.case_id]["patient"] = spec.patient_id
            bar.update(1)
        info = make_dataset_json(
            ds.channel_names, ds.labels, len(ds.sites) * cases_per_source, ds.file_ending, ds.short_name,
            cases=cases, modality=ds.modality, description=ds.description,
            reference="synthetic, generated by medalloy.data.synth", licence="CC0-1.0",
        )  # fmt: skip
        info["medalloy"]["synthetic"] = {"seed": int(seed), "sources": {k: asdict(s) for k, s in ds.sites.items()}}
        write_json_atomic(tmp / "dataset.json", info)
    return target


def _make_bar(total: int, progress: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="case", disable=not progress, leave=False)


def _generate(names: list[str], out: str | Path, seed: int, cases_per_source: int, test_cases_per_source: int, overwrite: bool, progress: bool) -> list[Path]:
    _check_counts(seed, cases_per_source, test_cases_per_source)
    datasets = [get_dataset(n) for n in names]
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MedalloyError("output path is a file", out, "give a folder to write the datasets into")
    for ds in datasets:  # refuse before writing anything, so a refusal never leaves half a collection
        _refuse_existing(out / ds.folder_name, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    total = sum(len(ds.sites) * (cases_per_source + test_cases_per_source) for ds in datasets)
    bar = _make_bar(total, progress, "synthetic data")
    try:
        return [_write_dataset(ds, out, seed, cases_per_source, test_cases_per_source, bar) for ds in datasets]
    finally:
        bar.close()


def generate_dataset(
    name: str | int,
    out: str | Path,
    seed: int = 0,
    cases_per_source: int = 10,
    test_cases_per_source: int = 3,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write one dataset of the collection to ``out/DatasetNNN_Name`` and return that folder.

    ``cases_per_source`` training cases (``imagesTr``/``labelsTr``) and ``test_cases_per_source``
    held-out cases (``imagesTs``/``labelsTs``) per source. The folder is built under a temporary name
    and renamed when complete; an existing non-empty folder is replaced only with ``overwrite``.
    """
    return _generate([get_dataset(name).folder_name], out, seed, cases_per_source, test_cases_per_source, overwrite, progress)[0]


def generate_collection(
    out: str | Path,
    seed: int = 0,
    cases_per_source: int = 10,
    test_cases_per_source: int = 3,
    overwrite: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Write all four datasets (901-904) under ``out`` and return their folders, in id order."""
    return _generate(DATASET_NAMES, out, seed, cases_per_source, test_cases_per_source, overwrite, progress)


# ------------------------------------------------------------------------------------------------
# Preview montage (for docs and a quick look)
# ------------------------------------------------------------------------------------------------
_LABEL_COLOURS = np.array([[0, 0, 0], [255, 214, 0], [0, 200, 255], [255, 60, 160], [90, 255, 90]], dtype=np.uint8)


def _fit(arr: np.ndarray, tile: int, order: int, aspect: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """Resize a 2D (or HxWx3) array to fit ``tile x tile`` keeping its physical aspect, zero-padded."""
    h, w = arr.shape[0] * aspect[0], arr.shape[1] * aspect[1]
    f = tile / max(h, w)
    zoom = (f * aspect[0], f * aspect[1]) + (1,) * (arr.ndim - 2)
    small = ndi.zoom(arr, zoom, order=order, mode="nearest", grid_mode=True)[:tile, :tile]
    outp = np.zeros((tile, tile) + arr.shape[2:], dtype=small.dtype)
    y0, x0 = (tile - small.shape[0]) // 2, (tile - small.shape[1]) // 2
    outp[y0 : y0 + small.shape[0], x0 : x0 + small.shape[1]] = small
    return outp


def _display(image: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` float -> ``(H, W, 3)`` uint8; grey is stretched between its 1st and 99.5th percentiles."""
    if image.shape[0] == 3:
        return np.moveaxis(np.clip(image, 0, 255), 0, -1).astype(np.uint8)
    lo, hi = np.percentile(image[0], [1, 99.5])
    grey = _to_uint8((image[0] - lo) / max(hi - lo, 1e-6))
    return np.repeat(grey[..., None], 3, axis=-1)


def _overlay(rgb: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Label boundaries drawn in each label's colour over the image."""
    edge = (label != ndi.grey_erosion(label, size=3)) | (label != ndi.grey_dilation(label, size=3))
    edge &= label > 0
    outp = rgb.copy()
    outp[edge] = _LABEL_COLOURS[np.clip(label[edge], 0, len(_LABEL_COLOURS) - 1)]
    return outp


def _tiles(image: np.ndarray, label: np.ndarray, meta, tile: int) -> list[np.ndarray]:
    if image.ndim == 3:  # 2D: the image, then the image with label contours
        rgb, lab = _fit(_display(image), tile, 1), _fit(label, tile, 0)
        return [rgb, _overlay(rgb, lab)]
    # 3D: the axial slice with most foreground, its contours, and a coronal slice at true aspect
    k = int(np.argmax((label > 0).sum(axis=(0, 1))))
    j = int(np.argmax((label > 0).sum(axis=(0, 2))))
    sp = meta.spacing
    ax_img, ax_lab = image[:, :, ::-1, k].transpose(0, 2, 1), label[:, ::-1, k].T  # rows = anterior first, cols = x
    ax_rgb, ax_lab = _fit(_display(ax_img), tile, 1, (sp[1], sp[0])), _fit(ax_lab, tile, 0, (sp[1], sp[0]))
    co_img = image[:, :, j, ::-1].transpose(0, 2, 1)  # rows = z (top = superior), cols = x
    co_rgb = _fit(_display(co_img), tile, 1, (sp[2], sp[0]))
    co_lab = _fit(label[:, j, ::-1].T, tile, 0, (sp[2], sp[0]))
    return [ax_rgb, _overlay(ax_rgb, ax_lab), _overlay(co_rgb, co_lab)]


def preview(dataset_dir: str | Path, cases_per_source: int = 2, tile: int = 64) -> np.ndarray:
    """A montage ``(H, W, 3)`` uint8: one row per source, ``cases_per_source`` training cases each.

    2D: image and image with label contours per case; 3D: axial slice, its contours, and a coronal
    slice drawn at its physical aspect (thick slices look blocky).
    """
    from medalloy.data.dataset import RawDataset

    raw = RawDataset(dataset_dir)
    rows = []
    for source in raw.sources:
        tiles: list[np.ndarray] = []
        for case in [c for c in raw.labelled_cases() if c.source == source][:cases_per_source]:
            image, label, meta = raw.load(case)
            tiles += _tiles(image, label, meta, tile)
        rows.append(np.concatenate(tiles, axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return np.concatenate(rows, axis=0)[:-2]


def write_preview(dataset_dir: str | Path, png: str | Path, cases_per_source: int = 2, tile: int = 64, overwrite: bool = False) -> Path:
    """Write :func:`preview` as a PNG (palette-compressed to stay small); refuses to replace a file unless ``overwrite``."""
    from PIL import Image

    png = Path(png)
    if file_ending(png) != ".png":
        raise MedalloyError("preview must be a .png file", png, "give a path ending in .png")
    if png.exists() and not overwrite:
        raise MedalloyError("file exists", png, "pass overwrite=True or choose another path")
    montage = preview(dataset_dir, cases_per_source, tile)
    with atomic_path(png, suffix=".png") as tmp:  # PIL picks the format from the ending
        Image.fromarray(montage).quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(tmp, optimize=True)
    return png


__all__ = [
    "COLLECTION",
    "DATASET_NAMES",
    "SiteShift",
    "SynthDataset",
    "generate_collection",
    "generate_dataset",
    "get_dataset",
    "preview",
    "render_case",
    "write_preview",
]
