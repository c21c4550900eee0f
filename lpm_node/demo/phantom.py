"""Synthetic chest CT phantoms with ground truth, and a fast DICOM CT series writer.

Anatomy is defined in millimetres in the patient's LPS frame (x toward the patient's left, y toward
posterior, z toward the head), with the top of the right hemidiaphragm near z = 0. The volume is sampled
slice by slice with vectorised numpy; masks come from the same geometry, so they are exact.
"""

from __future__ import annotations

import datetime as _dt
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, generate_uid

__all__ = ["Phantom", "make_phantom", "write_ct_series", "save_masks_nifti"]

HU_MIN = -1024
HU_MAX = 3071
RESCALE_INTERCEPT = -1024

# Soft-tissue attenuations (HU).
HU_AIR = -1000.0
HU_FAT = -100.0
HU_SKIN = 30.0
HU_MUSCLE = 50.0
HU_BLOOD = 42.0
HU_HEART = 40.0
HU_LUNG = -850.0
HU_BOWEL = 30.0
HU_KIDNEY = 32.0
HU_BONE_RIB = 650.0
HU_BONE_CORTEX = 900.0
HU_BONE_MARROW = 300.0
HU_CSF = 10.0
HU_TABLE = 120.0


@dataclass
class Phantom:
    """A synthetic CT volume with its ground truth.

    ``hu`` is int16 (z, y, x); z index 0 is the most inferior slice and z increases toward the head;
    x increases toward the patient's left and y toward posterior (LPS). ``origin`` is the LPS (x, y, z)
    position in mm of voxel [0, 0, 0]; ``spacing`` is (z, y, x) in mm.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    masks: dict[str, np.ndarray]
    liver_hu: float
    seed: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(z, y, x) shape of the volume."""
        return tuple(int(s) for s in self.hu.shape)  # type: ignore[return-value]

    def z_positions(self) -> np.ndarray:
        """LPS z (mm) of each slice, index 0 first (inferior)."""
        return self.origin[2] + self.spacing[0] * np.arange(self.hu.shape[0])


@dataclass(frozen=True)
class _Anatomy:
    """Seed-dependent anatomical parameters (mm, LPS, z relative to the right hemidiaphragm dome)."""

    body_a: float
    body_b: float
    fat: float
    dome_z: float
    liver_c: tuple[float, float, float]
    liver_ax: tuple[float, float, float]
    left_lobe_c: tuple[float, float, float]
    left_lobe_ax: tuple[float, float, float]
    spleen_c: tuple[float, float, float]
    spleen_ax: tuple[float, float, float]
    heart_c: tuple[float, float, float]
    heart_ax: tuple[float, float, float]
    vessels: tuple[tuple[tuple[float, float, float], tuple[float, float, float], float], ...]
    lesion_c: tuple[float, float, float]
    lesion_r: float


def _anatomy(rng: np.random.Generator) -> _Anatomy:
    u = rng.uniform
    body_a = 160.0 * u(0.93, 1.07)
    body_b = 112.0 * u(0.93, 1.07)
    fat = u(8.0, 22.0)
    inner_a = body_a - 2.0 - fat - 12.0
    dz = u(-8.0, 8.0)
    dx, dy = u(-5.0, 5.0), u(-5.0, 5.0)
    s = u(0.92, 1.08)
    liver_c = (-inner_a + 80.0 * s + dx, -8.0 + dy, -60.0 * s + dz)
    liver_ax = (88.0 * s, 82.0 * s * u(0.95, 1.05), 68.0 * s)
    left_lobe_c = (10.0 + dx + u(-8, 8), -48.0 + dy, -38.0 * s + dz)
    left_lobe_ax = (58.0 * s * u(0.85, 1.15), 28.0, 34.0 * s)
    spleen_c = (inner_a - 45.0 + u(-6, 6), body_b * 0.45 + u(-6, 6), -55.0 + dz + u(-8, 8))
    spleen_ax = (28.0 * u(0.9, 1.1), 48.0 * u(0.9, 1.1), 50.0 * u(0.9, 1.1))
    heart_c = (18.0 + u(-6, 6), -15.0 + u(-5, 5), 44.0 + dz)
    heart_ax = (64.0 * u(0.92, 1.08), 50.0 * u(0.92, 1.08), 52.0)
    # Hepatic vessels: portal vein from the medial hilum, hepatic veins draining into the IVC.
    # Every branch ends at least ~45 mm medial to the lateral wall of the right lobe.
    lat = -inner_a + 48.0 + dx
    hx, hy, hz = liver_c[0] + 32.0 * s, liver_c[1] + 18.0, liver_c[2] + 8.0
    ivc = (-22.0, body_b - 2.0 - fat - 12.0 - 48.0)
    vessels = (
        ((-2.0, hy + 18.0, hz - 60.0), (hx, hy, hz), 7.0),
        ((hx, hy, hz), (lat + u(0, 8), hy - 30.0, hz + u(10, 25)), 4.5),
        ((hx, hy, hz), (lat + u(4, 12), hy + 25.0, hz - u(15, 30)), 4.0),
        ((hx, hy, hz), (hx - 20.0, hy - 55.0, hz - 5.0), 4.0),
        ((hx, hy, hz), (left_lobe_c[0] + 15.0, left_lobe_c[1], left_lobe_c[2]), 4.0),
        ((ivc[0], ivc[1], dz - 12.0), (lat + u(2, 10), -18.0 + dy, -25.0 + dz), 5.0),
        ((ivc[0], ivc[1], dz - 12.0), (hx - 5.0, -50.0 + dy, -22.0 + dz), 4.5),
        ((ivc[0], ivc[1], dz - 12.0), (left_lobe_c[0], left_lobe_c[1] + 8.0, left_lobe_c[2] + 10.0), 4.5),
    )
    lesion_c = (liver_c[0] + 35.0 * s, liver_c[1] + 40.0 * s, liver_c[2] - 25.0 * s)
    return _Anatomy(
        body_a=body_a, body_b=body_b, fat=fat, dome_z=dz, liver_c=liver_c, liver_ax=liver_ax,
        left_lobe_c=left_lobe_c, left_lobe_ax=left_lobe_ax, spleen_c=spleen_c, spleen_ax=spleen_ax,
        heart_c=heart_c, heart_ax=heart_ax, vessels=vessels, lesion_c=lesion_c, lesion_r=11.0 * u(0.8, 1.2),
    )


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0


def _ellipsoid_section(
    x: np.ndarray, y: np.ndarray, z: float, c: tuple[float, float, float], ax: tuple[float, float, float]
) -> np.ndarray:
    """Cross-section of an axis-aligned ellipsoid at height z (all False when z is outside it)."""
    t = 1.0 - ((z - c[2]) / ax[2]) ** 2
    if t <= 0.0:
        return np.zeros(np.broadcast_shapes(x.shape, y.shape), dtype=bool)
    k = np.sqrt(t)
    return _ellipse(x, y, c[0], c[1], ax[0] * k, ax[1] * k)


def _segment_dist2(
    x: np.ndarray, y: np.ndarray, z: float, p0: tuple[float, float, float], p1: tuple[float, float, float]
) -> np.ndarray:
    """Squared distance (mm^2) from points (x, y, z) to the segment p0-p1."""
    d = np.subtract(p1, p0)
    ll = float(d @ d) or 1.0
    rx, ry, rz = x - p0[0], y - p0[1], z - p0[2]
    t = np.clip((rx * d[0] + ry * d[1] + rz * d[2]) / ll, 0.0, 1.0)
    return (rx - t * d[0]) ** 2 + (ry - t * d[1]) ** 2 + (rz - t * d[2]) ** 2


def _smoothstep(v: float, lo: float, hi: float) -> float:
    t = min(max((v - lo) / (hi - lo), 0.0), 1.0)
    return t * t * (3.0 - 2.0 * t)


def _field(rng: np.random.Generator, shape: tuple[int, int], coarse: int, sigma: float) -> np.ndarray:
    """A smooth zero-mean, unit-SD random 2D field upsampled from a coarse grid."""
    f = rng.standard_normal((coarse, coarse)).astype(np.float32)
    f = cv2.GaussianBlur(f, (0, 0), sigma)
    f = cv2.resize(f, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    sd = float(f.std()) or 1.0
    return (f - float(f.mean())) / sd


class _Field3D:
    """A smooth zero-mean random 3D field on a coarse grid, sampled slice by slice (coherent along z)."""

    def __init__(self, rng: np.random.Generator, z0: float, z1: float, z_step: float, coarse: int, sigma: float):
        from scipy.ndimage import gaussian_filter

        self.z0 = z0 - 2 * z_step
        self.z_step = z_step
        n = int(np.ceil((z1 - self.z0) / z_step)) + 3
        f = gaussian_filter(rng.standard_normal((n, coarse, coarse)).astype(np.float32), sigma)
        self.f = (f - f.mean()) / (f.std() or 1.0)

    def at(self, z: float, shape: tuple[int, int]) -> np.ndarray:
        t = (z - self.z0) / self.z_step
        i = int(np.clip(np.floor(t), 0, self.f.shape[0] - 2))
        w = float(np.clip(t - i, 0.0, 1.0))
        sl = (1.0 - w) * self.f[i] + w * self.f[i + 1]
        return cv2.resize(sl, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def _diaphragm(x: np.ndarray, y: np.ndarray, an: _Anatomy) -> np.ndarray:
    """Height (mm) of the diaphragm above each (x, y): right dome higher, both lower posteriorly."""
    right = an.dome_z - 62.0 * (((x + 55.0) / 95.0) ** 2 + ((y + 10.0) / 100.0) ** 2) - 0.12 * np.maximum(y, 0)
    left = an.dome_z - 14.0 - 62.0 * (((x - 55.0) / 95.0) ** 2 + ((y + 10.0) / 100.0) ** 2) - 0.12 * np.maximum(y, 0)
    return np.maximum(right, left)


def _render_slice(
    z: float, x: np.ndarray, y: np.ndarray, an: _Anatomy, liver_hu: float, spleen_hu: float, lesion: bool,
    rng: np.random.Generator, fat_field: _Field3D, lung_field: _Field3D,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """HU (float32, noiseless) and masks of one axial slice at height z."""
    # Body outline: chest/abdomen, narrowing to the neck above z ~ 150 mm.
    t_neck = _smoothstep(z, 140.0, 185.0)
    a = an.body_a * (1 - t_neck) + 62.0 * t_neck
    b = an.body_b * (1 - t_neck) + 58.0 * t_neck
    cy = 10.0 * t_neck
    fat = an.fat * (1 - t_neck) + 6.0 * t_neck
    body = _ellipse(x, y, 0.0, cy, a, b)
    shape = (y.shape[0], x.shape[1])
    img = np.full(shape, HU_AIR, dtype=np.float32)
    # Patient table under the back.
    table = (y > an.body_b + 14.0) & (y < an.body_b + 22.0) & (np.abs(x) < 210.0)
    img[table] = HU_TABLE
    img[body] = HU_SKIN
    ai, bi = a - 2.0, b - 2.0
    sub = _ellipse(x, y, 0.0, cy, ai, bi)
    img[sub] = HU_FAT
    am, bm = ai - fat, bi - fat
    muscle = _ellipse(x, y, 0.0, cy, am, bm)
    img[muscle] = HU_MUSCLE
    ac, bc = am - 12.0, bm - 12.0
    cavity = _ellipse(x, y, 0.0, cy, ac, bc)

    # Spine and paraspinal muscles (posterior midline).
    sy = cy + bc - 30.0
    disc = (z % 28.0) < 5.0
    vert = _ellipse(x, y, 0.0, sy, 17.0, 15.0)
    paraspinal = (_ellipse(x, y, -32.0, sy + 22.0, 26.0, 22.0) | _ellipse(x, y, 32.0, sy + 22.0, 26.0, 22.0)) & muscle
    thorax_cavity = cavity & ~paraspinal

    dia = _diaphragm(x, y, an)
    above = z > dia
    lung_top = 168.0
    masks: dict[str, np.ndarray] = {}

    # Abdomen below the diaphragm: soft tissue with fat, organs.
    abd = thorax_cavity & ~above
    if abd.any():
        ff = fat_field.at(z, shape)
        img[abd] = np.where(ff[abd] > 0.35, HU_FAT, HU_BOWEL)
    # Thorax above the diaphragm: lungs with texture, mediastinum.
    tho = thorax_cavity & above
    if z < lung_top and tho.any():
        mediastinum = _ellipse(x, y, 6.0, cy - 5.0, 32.0, bc + 5.0)
        lungs = tho & ~mediastinum
        tex = lung_field.at(z, shape)
        dots = _field(rng, shape, 150, 0.8)
        lung_hu = HU_LUNG + 25.0 * tex
        lung_hu = np.where(dots > 2.3, -150.0, lung_hu)
        img[lungs] = lung_hu[lungs]
        img[tho & mediastinum] = HU_FAT * 0.6
    elif tho.any():
        img[tho] = HU_MUSCLE * 0.8

    # Trachea and main bronchi.
    airway = np.zeros(shape, dtype=bool)
    for p0, p1, r in (((0.0, -20.0, 200.0), (0.0, -15.0, 110.0), 9.0),
                      ((0.0, -15.0, 110.0), (-45.0, -5.0, 85.0), 6.0),
                      ((0.0, -15.0, 110.0), (45.0, -5.0, 82.0), 6.0)):
        if min(p0[2], p1[2]) - r <= z <= max(p0[2], p1[2]) + r:
            d2 = _segment_dist2(x, y, z, p0, p1)
            img[(d2 <= (r + 2.0) ** 2) & cavity] = HU_MUSCLE * 0.6
            airway |= d2 <= r * r
    img[airway & cavity] = HU_AIR

    # Heart and great vessels.
    heart = _ellipsoid_section(x, y, z, an.heart_c, an.heart_ax) & above & thorax_cavity
    img[heart] = HU_HEART
    desc = (18.0, sy - 28.0)
    aorta = np.zeros(shape, dtype=bool)
    if z < 125.0:
        aorta |= _ellipse(x, y, desc[0], desc[1], 12.0, 12.0)
    if 60.0 < z < 128.0:
        aorta |= _ellipse(x, y, 5.0, -22.0, 15.0, 15.0)
    if 112.0 < z < 144.0:
        r = 13.0 * np.sqrt(max(0.0, 1.0 - ((z - 128.0) / 16.0) ** 2))
        aorta |= _segment_dist2(x, y, 128.0, (5.0, -22.0, 128.0), (desc[0], desc[1], 128.0)) <= r * r
    img[aorta & thorax_cavity] = HU_BLOOD
    ivc_c = (-22.0, an.body_b - 2.0 - an.fat - 12.0 - 48.0)
    ivc = _ellipse(x, y, ivc_c[0], ivc_c[1], 11.0, 10.0) & (z < an.dome_z + 5.0) & thorax_cavity

    # Kidneys (lower slices), stomach with a gas cap, spleen, liver.
    for kx in (-68.0, 68.0):
        kid = _ellipsoid_section(x, y, z, (kx, sy + 5.0, an.dome_z - 150.0), (26.0, 30.0, 55.0)) & abd
        img[kid] = HU_KIDNEY
    stomach_c = (48.0, -38.0, an.dome_z - 45.0)
    stomach = _ellipsoid_section(x, y, z, stomach_c, (42.0, 36.0, 42.0)) & abd
    img[stomach] = HU_AIR if z > stomach_c[2] + 22.0 else 12.0

    spleen = _ellipsoid_section(x, y, z, an.spleen_c, an.spleen_ax) & abd & ~stomach
    img[spleen] = spleen_hu
    masks["spleen"] = spleen

    liver_shape = (_ellipsoid_section(x, y, z, an.liver_c, an.liver_ax)
                   | _ellipsoid_section(x, y, z, an.left_lobe_c, an.left_lobe_ax))
    liver = liver_shape & abd & (z < dia - 1.0) & ~ivc & ~stomach & ~spleen & ~vert
    liver &= ~_ellipse(x, y, 0.0, sy, 30.0, 30.0)
    img[liver] = liver_hu
    parenchyma = liver.copy()
    if liver.any():
        ys, xs = np.nonzero(liver)
        win = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
        xw, yw = x[:, win[1]], y[win[0], :]
        vess = np.zeros((yw.shape[0], xw.shape[1]), dtype=bool)
        for p0, p1, r in an.vessels:
            if min(p0[2], p1[2]) - r <= z <= max(p0[2], p1[2]) + r:
                vess |= _segment_dist2(xw, yw, z, p0, p1) <= r * r
        vfull = np.zeros(shape, dtype=bool)
        vfull[win] = vess
        vfull &= liver
        img[vfull] = HU_BLOOD
        parenchyma &= ~vfull
        if lesion:
            lz = z - an.lesion_c[2]
            if abs(lz) < an.lesion_r:
                rr = np.sqrt(an.lesion_r**2 - lz**2)
                les = _ellipse(x, y, an.lesion_c[0], an.lesion_c[1], rr, rr) & liver
                img[les] = liver_hu - 35.0
                parenchyma &= ~les
    img[ivc] = HU_BLOOD
    masks["liver"] = liver
    masks["liver_parenchyma"] = parenchyma

    # Bones: vertebra (cortex, marrow, canal), ribs, sternum.
    img[vert] = HU_BONE_CORTEX
    img[_ellipse(x, y, 0.0, sy, 14.0, 12.0)] = 80.0 if disc else HU_BONE_MARROW
    lamina = _ellipse(x, y, 0.0, sy + 27.0, 15.0, 12.0)
    img[lamina] = HU_BONE_CORTEX * 0.7
    img[_ellipse(x, y, 0.0, sy + 26.0, 8.0, 7.0)] = HU_CSF
    if -90.0 + an.dome_z < z < 175.0:
        ring = _ellipse(x, y, 0.0, cy, ac + 9.0, bc + 9.0) & ~_ellipse(x, y, 0.0, cy, ac + 1.0, bc + 1.0)
        phase = ((z + 30.0 * (y - cy) / b + 6.0 * np.abs(x) / a) / 24.0) % 1.0
        ribs = ring & (phase < 0.33) & ~((np.abs(x) < 22.0) & (y < cy))
        img[ribs] = HU_BONE_RIB
        if 15.0 + an.dome_z < z < 170.0:
            img[_ellipse(x, y, 0.0, cy - bc - 5.0, 16.0, 6.0)] = HU_BONE_MARROW + 100.0
    masks["body"] = body
    return img, masks


def _scan_range(an: _Anatomy, n_slices: int, slice_spacing: float, liver_cut: bool) -> float:
    """Height (mm) of the lowest slice."""
    liver_bottom = an.liver_c[2] - an.liver_ax[2]
    if liver_cut:
        return an.liver_c[2] - 0.35 * an.liver_ax[2]
    return liver_bottom - 8.0


def make_phantom(
    liver_hu: float = 55.0,
    *,
    n_slices: int = 120,
    size: int = 512,
    pixel_spacing: float = 0.7,
    slice_spacing: float = 2.5,
    noise_sd: float = 12.0,
    spleen_hu: float = 50.0,
    lesion: bool = False,
    liver_cut: bool = False,
    seed: int = 0,
) -> Phantom:
    """Build a synthetic chest CT phantom.

    The lowest slice lies just below the liver (``liver_cut=False``; 120 x 2.5 mm then reach the lower neck)
    or through the lower liver (``liver_cut=True``). Anatomy is in mm, so keep ``size * pixel_spacing``
    near 358 mm (e.g. ``size=256, pixel_spacing=1.4``) to keep the whole body in the field of view.
    Liver parenchyma is exactly ``liver_hu`` before zero-mean Gaussian noise of SD ``noise_sd``.
    Shape and position vary slightly with ``seed``.
    """
    if n_slices < 1 or size < 16:
        raise ValueError("n_slices must be >= 1 and size >= 16")
    rng = np.random.default_rng(seed)
    an = _anatomy(rng)
    z0 = _scan_range(an, n_slices, slice_spacing, liver_cut)
    half = (size - 1) / 2.0 * pixel_spacing
    coords = np.arange(size, dtype=np.float32) * np.float32(pixel_spacing) - np.float32(half)
    x = coords[None, :]  # (1, size): broadcasting keeps per-axis terms 1D
    y = coords[:, None]  # (size, 1)
    hu = np.empty((n_slices, size, size), dtype=np.int16)
    names = ("liver", "spleen", "body", "liver_parenchyma")
    masks = {k: np.zeros((n_slices, size, size), dtype=np.uint8) for k in names}
    tex_rng = np.random.default_rng([seed, 1])
    noise_rng = np.random.default_rng([seed, 2])
    z1 = z0 + (n_slices - 1) * slice_spacing
    fat_field = _Field3D(tex_rng, z0, z1, 12.0, 48, 1.0)
    lung_field = _Field3D(tex_rng, z0, z1, 8.0, 32, 1.0)
    for k in range(n_slices):
        z = z0 + k * slice_spacing
        img, m = _render_slice(z, x, y, an, liver_hu, spleen_hu, lesion, tex_rng, fat_field, lung_field)
        if noise_sd > 0:
            img += noise_rng.standard_normal(img.shape, dtype=np.float32) * np.float32(noise_sd)
        np.clip(np.rint(img), HU_MIN, HU_MAX, out=img)
        hu[k] = img
        for name in names:
            masks[name][k] = m[name]
    info = {"liver_cut": liver_cut, "lesion": lesion, "spleen_hu": spleen_hu, "noise_sd": noise_sd}
    return Phantom(
        hu=hu,
        spacing=(float(slice_spacing), float(pixel_spacing), float(pixel_spacing)),
        origin=(-half, -half, float(z0)),
        masks=masks,
        liver_hu=float(liver_hu),
        seed=seed,
        info=info,
    )


@dataclass(frozen=True)
class SeriesGeometry:
    """A series shape to build phantoms on: slice count, matrix size, pixel and slice spacing (mm)."""

    name: str
    n_slices: int
    size: int
    pixel_spacing: float
    slice_spacing: float
    description: str

    def make_phantom(self, liver_hu: float = 55.0, **kwargs: Any) -> Phantom:
        """:func:`make_phantom` on this geometry (other keyword arguments passed through)."""
        return make_phantom(
            liver_hu, n_slices=self.n_slices, size=self.size, pixel_spacing=self.pixel_spacing,
            slice_spacing=self.slice_spacing, **kwargs,
        )

    @property
    def series_description(self) -> str:
        """A SeriesDescription for the written series, e.g. ``CHEST WO CONTRAST 1.25mm``."""
        return f"CHEST WO CONTRAST {self.slice_spacing:g}mm"


GEOMETRIES: dict[str, SeriesGeometry] = {
    g.name: g
    for g in (
        SeriesGeometry("on-grid", 300, 512, 0.7, 2.5, "on the method grid (0.7 x 0.7 x 2.5 mm): no resampling"),
        SeriesGeometry("thin", 600, 512, 0.78, 1.25, "thin-slice chest CT (0.78 mm pixels, 1.25 mm slices)"),
        SeriesGeometry("thick", 72, 512, 0.68, 5.0, "thick-slice chest CT (0.68 mm pixels, 5 mm slices)"),
    )
}
"""Series shapes of the benchmarks: the method grid itself and two off-grid shapes of real chest CT."""


# ---------------------------------------------------------------------------------------------- DICOM writer


def _ds_str(v: float) -> str:
    """A DICOM decimal string (at most 16 characters)."""
    s = f"{v:.6f}".rstrip("0").rstrip(".")
    if s in ("-0", ""):
        s = "0"
    return s[:16]


def _uid(*parts: Any) -> UID:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _base_dataset(
    phantom: Phantom, *, feet_first: bool, study_uid: str, series_uid: str, for_uid: str, patient_id: str,
    patient_name: str, series_number: int, series_description: str, study_description: str, body_part: str,
) -> Dataset:
    """The attributes shared by every slice of the series."""
    now = _dt.datetime(2024, 3, 14, 9, 30, 0) + _dt.timedelta(minutes=phantom.seed % 600)
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    nz, ny, nx = phantom.hu.shape
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
    ds.AccessionNumber = f"A{zlib.crc32(study_uid.encode()) % 10**8:08d}"
    ds.Modality = "CT"
    ds.Manufacturer = "LPM Phantom Works"
    ds.InstitutionName = "Phantom General Hospital"
    ds.ReferringPhysicianName = "Referrer^Pat"
    ds.StationName = "PHANTOMCT1"
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    ds.ManufacturerModelName = "Synthetic CT 128"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19580704"
    ds.PatientSex = "O"
    ds.PatientAge = "065Y"
    ds.BodyPartExamined = body_part
    ds.SliceThickness = _ds_str(phantom.spacing[0])
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.SoftwareVersions = "lpm-node phantom"
    ds.ReconstructionDiameter = _ds_str(nx * phantom.spacing[2])
    ds.DistanceSourceToDetector = "1085.6"
    ds.DistanceSourceToPatient = "595"
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "150"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = "80"
    ds.Exposure = "40"
    ds.FilterType = "FLAT"
    ds.GeneratorPower = "10"
    ds.FocalSpots = "1.2"
    ds.ConvolutionKernel = "B30f"
    ds.PatientPosition = "FFS" if feet_first else "HFS"
    ds.RevolutionTime = 0.5
    ds.SingleCollimationWidth = 0.6
    ds.TotalCollimationWidth = 38.4
    ds.TableSpeed = 92.16
    ds.TableFeedPerRotation = 46.08
    ds.SpiralPitchFactor = 1.2
    ds.CTDIvol = 3.1
    phantom_code = Dataset()
    phantom_code.CodeValue = "113691"
    phantom_code.CodingSchemeDesignator = "DCM"
    phantom_code.CodeMeaning = "IEC Body Dosimetry Phantom"
    ds.CTDIPhantomTypeCodeSequence = [phantom_code]
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ny
    ds.Columns = nx
    ds.PixelSpacing = [_ds_str(phantom.spacing[1]), _ds_str(phantom.spacing[2])]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = str(RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def _apply_overrides(ds: Dataset, overrides: dict[str, Any] | None) -> None:
    from pydicom.datadict import tag_for_keyword

    for keyword, value in (overrides or {}).items():
        if tag_for_keyword(keyword) is None:
            raise ValueError(f"overrides: {keyword!r} is not a DICOM keyword")
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)


def write_ct_series(
    phantom: Phantom,
    out_dir: str | Path,
    *,
    feet_first: bool = False,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_id: str = "PHANTOM001",
    patient_name: str = "Phantom^Chest",
    series_number: int = 2,
    series_description: str = "CHEST WO CONTRAST 2.5mm",
    study_description: str = "CT CHEST LOW DOSE",
    body_part: str = "CHEST",
    overrides: dict[str, Any] | None = None,
    transfer_syntax: str = pydicom.uid.ExplicitVRLittleEndian,
) -> list[Path]:
    """Write ``phantom`` as a CT Image Storage series, one file per slice, and return the paths.

    Instance 1 is the most superior slice (head-first, HFS) or the most inferior one (``feet_first``, FFS);
    the patient geometry is the same either way. UIDs are derived deterministically from the phantom's seed,
    the patient id and the series parameters unless given. ``overrides`` sets attributes by keyword on every
    instance (``None`` deletes one). Pixel data are stored unsigned with RescaleIntercept -1024.
    ``transfer_syntax``: Implicit/Explicit VR Little Endian, Deflated Explicit VR Little Endian, RLE Lossless
    (pylibjpeg-rle), JPEG 2000 Lossless (pylibjpeg-openjpeg), JPEG-LS Lossless (pyjpegls) and JPEG Lossless
    SV1 (dcmtk's ``dcmcjpeg``, one process per file: slower).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    syntax = UID(transfer_syntax)
    study_uid = study_uid or _uid("study", phantom.seed, patient_id, study_description)
    ovr_key = json.dumps(overrides or {}, sort_keys=True, default=str)
    series_uid = series_uid or _uid(
        "series", study_uid, series_number, series_description, feet_first, phantom.liver_hu, ovr_key,
        phantom.hu.shape,
    )
    for_uid = _uid("for", study_uid, series_uid)
    ds = _base_dataset(
        phantom, feet_first=feet_first, study_uid=study_uid, series_uid=series_uid, for_uid=for_uid,
        patient_id=patient_id, patient_name=patient_name, series_number=series_number,
        series_description=series_description, study_description=study_description, body_part=body_part,
    )
    _apply_overrides(ds, overrides)
    nz = phantom.hu.shape[0]
    ox, oy, _ = phantom.origin
    zs = phantom.z_positions()
    paths: list[Path] = []
    dcmcjpeg = syntax == pydicom.uid.JPEGLosslessSV1
    write_syntax = pydicom.uid.ExplicitVRLittleEndian if dcmcjpeg else syntax
    for i in range(1, nz + 1):
        k = i - 1 if feet_first else nz - i
        sop_uid = _uid("sop", series_uid, i)
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = i
        ds.ImagePositionPatient = [_ds_str(ox), _ds_str(oy), _ds_str(float(zs[k]))]
        ds.SliceLocation = _ds_str(float(zs[k]))
        stored = (phantom.hu[k].astype(np.int32) - RESCALE_INTERCEPT).astype(np.uint16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = write_syntax
        ds.file_meta = meta
        _set_pixels(ds, stored, write_syntax)
        path = out / f"CT{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True, implicit_vr=write_syntax == pydicom.uid.ImplicitVRLittleEndian,
                   little_endian=True)
        paths.append(path)
    if dcmcjpeg:
        _dcmcjpeg(paths)
    return paths


def _set_pixels(ds: Dataset, stored: np.ndarray, syntax: UID) -> None:
    """Set PixelData, encoding it when ``syntax`` is compressed."""
    for kw in ("PixelData",):
        if kw in ds:
            del ds[kw]
    if not syntax.is_compressed:
        ds.PixelData = stored.tobytes()
        ds["PixelData"].VR = "OW"
        return
    plugin = {pydicom.uid.RLELossless: "pylibjpeg"}.get(syntax, "")
    # compress() expects an uncompressed transfer syntax on entry.
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.compress(syntax, stored, encoding_plugin=plugin, generate_instance_uid=False)


def _dcmcjpeg(paths: list[Path]) -> None:
    """Re-encode files in place as JPEG Lossless SV1 with dcmtk's ``dcmcjpeg``."""
    import shutil
    import subprocess

    exe = shutil.which("dcmcjpeg")
    if exe is None:
        raise ValueError("JPEG Lossless encoding needs dcmtk's dcmcjpeg on PATH")
    for p in paths:
        tmp = p.with_suffix(".jpg.dcm")
        subprocess.run([exe, "+e1", str(p), str(tmp)], check=True, capture_output=True)
        tmp.replace(p)


# ---------------------------------------------------------------------------------------------- NIfTI, CLI


def phantom_image(phantom: Phantom, array: np.ndarray | None = None) -> Any:
    """``array`` (default: the HU volume) as a SimpleITK image with the phantom's LPS geometry."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(phantom.hu if array is None else array)
    sz, sy, sx = phantom.spacing
    img.SetSpacing((sx, sy, sz))
    img.SetOrigin(phantom.origin)
    img.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return img


def save_masks_nifti(phantom: Phantom, out_dir: str | Path) -> dict[str, Path]:
    """Write the CT (``ct``) and every mask as NIfTI files with the phantom's geometry; return name -> path."""
    import SimpleITK as sitk

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, arr in [("ct", phantom.hu), *phantom.masks.items()]:
        p = out / f"{name}.nii.gz"
        sitk.WriteImage(phantom_image(phantom, arr), str(p), useCompression=True)
        paths[name] = p
    return paths
