"""The QC's calibration cases: controls that must get their definite category and hazards that must not.

Controls: clean livers at 30, 38, 42 and 60 HU, noise SD 12 to 25, on every liver shape the project can make (the
phantom's analytic liver for several seeds, an ellipsoid liver, and the published reference label and nnU-Net mask
in a synthetic body), with tight fields of view that cut the body wall 15-25 mm beyond the liver, stored RAS,
feet-first or prone with an honest header. Hazards: a left-right mirrored image with a consistent-looking header, a
prone image whose orientation was lost, a larger spleen-like component beside a small liver, a lesion over about a
quarter of one ROI disk, a field of view through the liver.

A case is defined on the LPS method grid (``truth_hu``, ``truth_label``) with a ``storage``: how a scanner or a
converter stored it. ``claimed()`` gives the arrays as the header would present them in LPS (what the measurement
sees: for an honest header the truth, for a lying one the mirrored truth); ``write_nifti`` writes the stored arrays
with their header for ``lpm-node measure``; ``write_dicom`` writes a DICOM series for ``process`` and the node.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache, partial
from pathlib import Path

import cv2
import numpy as np
import pydicom

from lpm_node.demo.phantom import Phantom, make_phantom, write_ct_series
from lpm_node.imaging.measurement import Category, dl_parenchymal_roi, roi_structuring_element

THRESHOLD_HU = 40.0
METHOD_SPACING_ZYX = (2.5, 0.7, 0.7)
CONTROL_HU = (30.0, 38.0, 42.0, 60.0)
NOISE_SD = (12.0, 25.0)
TIGHT_MARGINS_MM = (15.0, 20.0, 25.0)
PHANTOM_SEEDS = (1, 2, 3)
REFERENCE_MASKS = {
    "published label": "LIDC-IDRI_0002_3d_liver_seg.nii.gz",
    "published nnU-Net mask": "LIDC-IDRI_0002_img_nnunet_to_seg_top1mask.nii.gz",
}

# How a case is stored: (flip z, flip y, flip x) of the stored array against LPS, whether the header states it
# (honest) or claims plain LPS (lying), and the DICOM Patient Position.
STORAGES: dict[str, tuple[tuple[bool, bool, bool], bool, str]] = {
    "LPS": ((False, False, False), True, "HFS"),
    "RAS-stored": ((False, True, True), True, "HFS"),
    "feet-first": ((True, False, False), True, "FFS"),
    "prone": ((False, True, True), True, "HFP"),
    "mirrored": ((False, False, True), False, "HFS"),
    "prone, orientation lost": ((False, True, True), False, "HFP"),
}


def expected_category(liver_hu: float) -> str:
    return Category.STEATOSIS if liver_hu < THRESHOLD_HU else Category.NO_STEATOSIS


Volume = tuple[np.ndarray, np.ndarray, tuple[float, ...]]  # HU int16, liver label uint8 (z, y, x) LPS, origin


@dataclass
class QcCase:
    """One calibration case on the method grid; its arrays are made when first used (``build``)."""

    name: str
    group: str  # "control" | "hazard"
    expected: str  # the category a control must get; Category.NOT_ASSESSABLE for a hazard
    build: Callable[[], Volume]
    storage: str = "LPS"

    @cached_property
    def _volume(self) -> Volume:
        return self.build()

    @property
    def truth_hu(self) -> np.ndarray:
        """HU, int16 (z, y, x), LPS."""
        return self._volume[0]

    @property
    def truth_label(self) -> np.ndarray:
        """The liver label (uint8) before the largest-component step, LPS."""
        return self._volume[1]

    @property
    def origin(self) -> tuple[float, ...]:
        """LPS (x, y, z) mm of voxel [0, 0, 0]."""
        return self._volume[2]

    def _flips(self) -> tuple[bool, bool, bool]:
        return STORAGES[self.storage][0]

    def _stored(self, array: np.ndarray) -> np.ndarray:
        axes = tuple(a for a, f in enumerate(self._flips()) if f)
        return np.ascontiguousarray(np.flip(array, axis=axes)) if axes else array

    def claimed(self) -> tuple[np.ndarray, np.ndarray]:
        """(HU, label) in LPS as the header presents them: the truth for an honest header, the stored arrays read
        as plain LPS for a lying one."""
        if STORAGES[self.storage][1]:
            return self.truth_hu, self.truth_label
        return self._stored(self.truth_hu), self._stored(self.truth_label)

    def write_nifti(self, folder: Path, compress: bool = True) -> tuple[Path, Path]:
        """The stored CT and label as NIfTI with their header's affine; returns (ct, label) paths."""
        import SimpleITK as sitk

        folder.mkdir(parents=True, exist_ok=True)
        flips, honest, _ = STORAGES[self.storage]
        shape = self.truth_hu.shape
        spacing = (METHOD_SPACING_ZYX[2], METHOD_SPACING_ZYX[1], METHOD_SPACING_ZYX[0])
        direction = np.eye(3)
        origin = np.asarray(self.origin, dtype=float)
        if honest:
            for axis_zyx, flip in enumerate(flips):
                if flip:
                    p = 2 - axis_zyx  # physical axis of array axis (z, y, x)
                    direction[p, p] = -1.0
                    origin[p] += (shape[axis_zyx] - 1) * spacing[p]
        paths = []
        for name, array in (("ct", self.truth_hu), ("liver", self.truth_label)):
            image = sitk.GetImageFromArray(self._stored(array))
            image.SetSpacing(spacing)
            image.SetOrigin(tuple(float(v) for v in origin))
            image.SetDirection(tuple(float(v) for v in direction.ravel()))
            path = folder / (f"{name}.nii.gz" if compress else f"{name}.nii")
            sitk.WriteImage(image, str(path), useCompression=compress)
            paths.append(path)
        return paths[0], paths[1]


# ------------------------------------------------------------------------------------------------- liver shapes


@lru_cache(maxsize=8)
def _phantom_anatomy(seed: int) -> Phantom:
    """A noise-free phantom chest on the method grid (64 slices from below the liver), parenchyma at 0 HU."""
    return make_phantom(0.0, n_slices=64, size=512, pixel_spacing=0.7, slice_spacing=2.5, noise_sd=0.0, seed=seed)


def _with_liver(base: np.ndarray, parenchyma: np.ndarray, liver_hu: float, noise_sd: float,
                seed: int) -> np.ndarray:
    """``base`` HU with the parenchyma set to ``liver_hu`` and Gaussian noise of ``noise_sd`` everywhere."""
    rng = np.random.default_rng(seed)
    hu = base.astype(np.float32)
    hu[parenchyma] = liver_hu
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(noise_sd)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def phantom_shape(seed: int) -> Callable[[float, float], tuple[np.ndarray, np.ndarray, tuple[float, ...]]]:
    def make(liver_hu: float, noise_sd: float) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
        p = _phantom_anatomy(seed)
        hu = _with_liver(p.hu, p.masks["liver_parenchyma"] > 0, liver_hu, noise_sd, seed * 1000 + int(liver_hu))
        return hu, p.masks["liver"].copy(), p.origin

    return make


def _ellipse_body(shape: tuple[int, int, int], centre_yx: tuple[float, float], axes_yx: tuple[float, float],
                  wall_px: float = 14.0) -> np.ndarray:
    """HU of a body: air outside, skin and fat, muscle, soft tissue (35 HU) inside."""
    yy, xx = np.ogrid[: shape[1], : shape[2]]
    r = np.sqrt(((yy - centre_yx[0]) / axes_yx[0]) ** 2 + ((xx - centre_yx[1]) / axes_yx[1]) ** 2)
    plane = np.full(shape[1:], -1000.0, dtype=np.float32)
    plane[r <= 1.0] = -100.0
    inner = 1.0 - wall_px / min(axes_yx)
    plane[r <= inner] = 50.0
    plane[r <= inner - 6.0 / min(axes_yx)] = 35.0
    return np.broadcast_to(plane, shape).copy()


def ellipsoid_shape(liver_hu: float, noise_sd: float) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """An ellipsoid liver (about 1100 ml) against the right wall of an elliptic body."""
    shape = (48, 400, 460)
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    body = _ellipse_body(shape, (200.0, 230.0), (170.0, 215.0))
    liver = (((zz - 24) / 22.0) ** 2 + ((yy - 190) / 110.0) ** 2 + ((xx - 165) / 110.0) ** 2) <= 1.0
    hu = _with_liver(body, liver, liver_hu, noise_sd, 7 + int(liver_hu))
    return hu, liver.astype(np.uint8), (-161.0, -140.0, 0.0)


def shared_folder() -> Path | None:
    """The published method's reference folder: ``$LPM_NODE_SHARED`` or ``<repo>/../shared``; None when absent."""
    repo = Path(__file__).resolve().parents[2]
    for base in (os.environ.get("LPM_NODE_SHARED", ""), str(repo.parent / "shared")):
        if base and (Path(base) / "reference" / "dl-parenchymal").is_dir():
            return Path(base) / "reference" / "dl-parenchymal"
    return None


@lru_cache(maxsize=4)
def _reference_mask(name: str) -> tuple[np.ndarray, tuple[float, ...]]:
    import SimpleITK as sitk

    folder = shared_folder()
    if folder is None:
        raise FileNotFoundError("the published reference files are not found (<repo>/../shared or LPM_NODE_SHARED)")
    image = sitk.ReadImage(str(folder / REFERENCE_MASKS[name]))
    return (sitk.GetArrayFromImage(image) > 0).astype(np.uint8), tuple(image.GetOrigin())


def reference_shape(name: str) -> Callable[[float, float], tuple[np.ndarray, np.ndarray, tuple[float, ...]]]:
    """A published liver mask in a synthetic body: an elliptic body over the image, widened to keep 50 px (35 mm)
    of body wall around the liver on every slice; the scan cut 15 slices above the liver."""

    def make(liver_hu: float, noise_sd: float) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
        liver, origin = _reference_mask(name)
        top = int(np.flatnonzero(liver.any(axis=(1, 2)))[-1]) + 15
        liver = liver[: top + 1]
        shape = liver.shape
        body = _ellipse_body(shape, (shape[1] / 2.0, shape[2] / 2.0), (shape[1] * 0.4, shape[2] * 0.46))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (101, 101))
        for z in np.flatnonzero(liver.any(axis=(1, 2))):
            around = cv2.dilate(liver[z], kernel).astype(bool)
            wall = around & (body[z] < -500)
            body[z][wall] = 35.0
        hu = _with_liver(body, liver > 0, liver_hu, noise_sd, 11 + int(liver_hu))
        return hu, liver.copy(), origin

    return make


def liver_shapes(with_reference: bool = True) -> dict[str, Callable[[float, float], tuple]]:
    shapes: dict[str, Callable[[float, float], tuple]] = {
        f"phantom seed {seed}": phantom_shape(seed) for seed in PHANTOM_SEEDS
    }
    shapes["ellipsoid"] = ellipsoid_shape
    if with_reference and shared_folder() is not None:
        shapes.update({name: reference_shape(name) for name in REFERENCE_MASKS})
    return shapes


# ---------------------------------------------------------------------------------------------------- the cases


def tight_field_of_view(hu: np.ndarray, label: np.ndarray, origin: tuple[float, ...], margin_mm: float
                        ) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """The image cropped at ``margin_mm`` lateral to the liver's most lateral point: the body wall is cut there."""
    x_min = int(np.argmax(label.any(axis=(0, 1))))
    start = max(x_min - int(round(margin_mm / METHOD_SPACING_ZYX[2])), 0)
    new_origin = (origin[0] + start * METHOD_SPACING_ZYX[2], origin[1], origin[2])
    return np.ascontiguousarray(hu[:, :, start:]), np.ascontiguousarray(label[:, :, start:]), new_origin


def _tight(make: Callable[[float, float], Volume], liver_hu: float, margin_mm: float) -> Volume:
    return tight_field_of_view(*make(liver_hu, 18.0), margin_mm)


def controls(with_reference: bool = True) -> Iterator[QcCase]:
    """Every control: each liver shape at each control HU and noise SD; tight fields of view; other storages."""
    for shape_name, make in liver_shapes(with_reference).items():
        for liver_hu in CONTROL_HU:
            for noise in NOISE_SD:
                yield QcCase(f"{shape_name}, {liver_hu:g} HU, noise {noise:g}", "control",
                             expected_category(liver_hu), partial(make, liver_hu, noise))
        for liver_hu, margin in zip((38.0, 42.0, 38.0), TIGHT_MARGINS_MM, strict=True):
            yield QcCase(f"{shape_name}, {liver_hu:g} HU, wall cut {margin:g} mm beyond the liver", "control",
                         expected_category(liver_hu), partial(_tight, make, liver_hu, margin))
    for storage in ("RAS-stored", "feet-first", "prone"):
        for shape_name, liver_hu in (("phantom seed 1", 38.0), ("ellipsoid", 42.0)):
            yield QcCase(f"{shape_name}, {liver_hu:g} HU, {storage}", "control", expected_category(liver_hu),
                         partial(liver_shapes(False)[shape_name], liver_hu, 18.0), storage=storage)


def _lesion_over_a_quarter_disk(hu: np.ndarray, label: np.ndarray, lesion_hu: float) -> np.ndarray:
    """``hu`` with a lesion (``lesion_hu``, 7.5 mm high) over the medial quarter of the middle ROI disk."""
    _, slices, centres = dl_parenchymal_roi(label)
    z, y, x = centres[len(centres) // 2]
    disk = roi_structuring_element().astype(bool)
    half = disk.shape[0] // 2
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    lesion = disk & (xx >= 5)  # the disk's medial quarter (about 100 of 401 pixels)
    out = hu.copy()
    rng = np.random.default_rng(5)
    for dz in (-1, 0, 1):
        window = out[z + dz, y - half : y + half + 1, x - half : x + half + 1]
        window[lesion] = np.rint(lesion_hu + rng.normal(0.0, 12.0, int(lesion.sum()))).astype(np.int16)
    return out


def _with_lesion(make: Callable[[float, float], Volume]) -> Volume:
    hu, label, origin = make(46.0, 12.0)
    return _lesion_over_a_quarter_disk(hu, label, -50.0), label, origin


def _into_liver(make: Callable[[float, float], Volume], mask_short: bool) -> Volume:
    """The image cut 20 mm inside the liver's lateral edge; ``mask_short``: the new edge shows a drawn body wall
    (fat, muscle: 7 mm) and the label stops short of it."""
    hu, label, origin = make(35.0, 12.0)
    cut = int(np.argmax(label.any(axis=(0, 1)))) + int(round(20.0 / METHOD_SPACING_ZYX[2]))
    hu, label = np.ascontiguousarray(hu[:, :, cut:]), np.ascontiguousarray(label[:, :, cut:])
    if mask_short:
        wall_px = int(round(3.5 / METHOD_SPACING_ZYX[2]))
        hu[:, :, :wall_px] = -100
        hu[:, :, wall_px : 2 * wall_px] = 50
        label[:, :, : 2 * wall_px] = 0
    return hu, label, (origin[0] + cut * METHOD_SPACING_ZYX[2], origin[1], origin[2])


def hazards(with_reference: bool = True) -> Iterator[QcCase]:
    """Every hazard of the issue: none may get a definite category."""
    for shape_name in ("phantom seed 1", "ellipsoid"):
        make = liver_shapes(False)[shape_name]
        for storage in ("mirrored", "prone, orientation lost"):
            for liver_hu in (30.0, 60.0):
                yield QcCase(f"{shape_name}, {liver_hu:g} HU, {storage}", "hazard", Category.NOT_ASSESSABLE,
                             partial(make, liver_hu, 12.0), storage=storage)
    if with_reference and shared_folder() is not None:
        yield QcCase("published nnU-Net mask, 60 HU, mirrored", "hazard", Category.NOT_ASSESSABLE,
                     partial(reference_shape("published nnU-Net mask"), 60.0, 12.0), storage="mirrored")
    for seed in PHANTOM_SEEDS:
        yield QcCase(f"phantom seed {seed}, 55 HU, larger spleen-like component beside a small liver", "hazard",
                     Category.NOT_ASSESSABLE, partial(_spleen_beside_small_liver, seed))
    for shape_name in ("phantom seed 1", "phantom seed 2", "ellipsoid"):
        yield QcCase(f"{shape_name}, 46 HU, lesion over a quarter of one ROI disk", "hazard", Category.NOT_ASSESSABLE,
                     partial(_with_lesion, liver_shapes(False)[shape_name]))
    for shape_name in ("phantom seed 1", "ellipsoid"):
        make = liver_shapes(False)[shape_name]
        yield QcCase(f"{shape_name}, 35 HU, field of view 20 mm into the liver", "hazard", Category.NOT_ASSESSABLE,
                     partial(_into_liver, make, False))
        yield QcCase(f"{shape_name}, 35 HU, field of view into the liver, mask 7 mm short of it", "hazard",
                     Category.NOT_ASSESSABLE, partial(_into_liver, make, True))


def _spleen_beside_small_liver(seed: int) -> Volume:
    """A small liver (its top, about 220 ml) beside a spleen-like component enlarged to outweigh it (splenomegaly),
    both labelled liver: the largest-component step keeps the spleen-like one."""
    p = _phantom_anatomy(seed)
    liver = p.masks["liver"] > 0
    areas = liver.sum(axis=(1, 2)) * 1.225 / 1000.0  # ml per slice
    from_top = np.cumsum(areas[::-1])
    keep_from = liver.shape[0] - 1 - int(np.searchsorted(from_top, 220.0))
    small = liver.copy()
    small[:keep_from] = False
    spleen = (p.masks["spleen"] > 0).view(np.uint8)
    grow = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (61, 61))
    gap = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (11, 11))
    big = np.zeros_like(liver)
    for z in range(liver.shape[0]):
        if spleen[z].any():
            near_liver = cv2.dilate(liver[z].view(np.uint8), gap).astype(bool)
            big[z] = cv2.dilate(spleen[z], grow).astype(bool) & (p.masks["body"][z] > 0) & ~near_liver
    base = p.hu.astype(np.float32)
    base[big] = 50.0
    hu = _with_liver(base, p.masks["liver_parenchyma"] > 0, 55.0, 12.0, seed)
    return hu, (small | big).astype(np.uint8), p.origin


def all_cases(with_reference: bool = True) -> Iterator[QcCase]:
    yield from controls(with_reference)
    yield from hazards(with_reference)


# ------------------------------------------------------------------------------------------- DICOM for process


@dataclass(frozen=True)
class SeriesCase:
    """A DICOM phantom case for ``process`` and the node (the bundled model segments it)."""

    name: str
    group: str
    expected: str
    make: Callable[[], Phantom]
    storage: str = "LPS"
    lesion: bool = False


DICOM_GRID = {"n_slices": 64, "size": 256, "pixel_spacing": 1.4}


def _crop_columns(phantom: Phantom, start: int, stop: int | None = None) -> Phantom:
    sx = phantom.spacing[2]
    origin = (phantom.origin[0] + start * sx, phantom.origin[1], phantom.origin[2])
    return replace(phantom, hu=np.ascontiguousarray(phantom.hu[:, :, start:stop]), origin=origin,
                   masks={k: np.ascontiguousarray(v[:, :, start:stop]) for k, v in phantom.masks.items()})


def dicom_phantom(liver_hu: float, seed: int, noise_sd: float = 12.0, tight_margin_mm: float | None = None,
                  into_liver_mm: float | None = None) -> Callable[[], Phantom]:
    def make() -> Phantom:
        p = make_phantom(liver_hu, seed=seed, noise_sd=noise_sd, **DICOM_GRID)  # type: ignore[arg-type]
        x_min = int(np.argmax((p.masks["liver"] > 0).any(axis=(0, 1))))
        if tight_margin_mm is not None:
            return _crop_columns(p, max(x_min - int(round(tight_margin_mm / p.spacing[2])), 0))
        if into_liver_mm is not None:
            return _crop_columns(p, x_min + int(round(into_liver_mm / p.spacing[2])))
        return p

    return make


def series_cases() -> list[SeriesCase]:
    """The controls and hazards that ``process`` and the node can be given as DICOM (the model segments them, so
    a label-only hazard, the spleen-like component, is left to ``measure``)."""
    cases = [
        SeriesCase(f"phantom, {hu:g} HU, noise {sd:g}", "control", expected_category(hu), dicom_phantom(hu, seed, sd))
        for hu, seed, sd in ((30.0, 41, 12.0), (38.0, 42, 25.0), (42.0, 43, 25.0), (60.0, 44, 12.0))
    ]
    cases += [
        SeriesCase(f"phantom, {hu:g} HU, wall cut {margin:g} mm beyond the liver", "control", expected_category(hu),
                   dicom_phantom(hu, seed, 18.0, tight_margin_mm=margin))
        for hu, seed, margin in ((38.0, 45, 15.0), (42.0, 46, 25.0))
    ]
    cases += [
        SeriesCase("phantom, 38 HU, feet-first", "control", Category.STEATOSIS, dicom_phantom(38.0, 47), "feet-first"),
        SeriesCase("phantom, 42 HU, prone", "control", Category.NO_STEATOSIS, dicom_phantom(42.0, 48), "prone"),
        SeriesCase("phantom, 30 HU, mirrored", "hazard", Category.NOT_ASSESSABLE, dicom_phantom(30.0, 49), "mirrored"),
        SeriesCase("phantom, 60 HU, prone, orientation lost", "hazard", Category.NOT_ASSESSABLE,
                   dicom_phantom(60.0, 50), "prone, orientation lost"),
        SeriesCase("phantom, 46 HU, lesion over a quarter of one ROI disk", "hazard", Category.NOT_ASSESSABLE,
                   dicom_phantom(46.0, 51), lesion=True),
        SeriesCase("phantom, 35 HU, field of view 20 mm into the liver", "hazard", Category.NOT_ASSESSABLE,
                   dicom_phantom(35.0, 52, into_liver_mm=20.0)),
    ]
    return cases


def _lesion_on_source(phantom: Phantom, roi_centres: list[list[int]]) -> Phantom:
    """The quarter-disk lesion (-50 HU, 7.5 mm high) over the medial quarter of the middle ROI disk that the node
    placed on the same series without it (``roi_centres`` [z, y, x] on the method grid, which shares the series'
    first voxel and its 2.5 mm slices)."""
    sz, sy, sx = phantom.spacing
    z, y, x = roi_centres[len(roi_centres) // 2]
    yy, xx = np.mgrid[: phantom.shape[1], : phantom.shape[2]]
    py, px = yy * sy / METHOD_SPACING_ZYX[1], xx * sx / METHOD_SPACING_ZYX[2]  # source pixel centres, grid px
    radius = roi_structuring_element().shape[0] / 2.0
    quarter = ((py - y) ** 2 + (px - x) ** 2 <= radius**2) & (px - x >= 5)
    hu = phantom.hu.copy()
    rng = np.random.default_rng(9)
    for dz in (-1, 0, 1):
        hu[z + dz][quarter] = np.rint(-50.0 + rng.normal(0.0, 12.0, int(quarter.sum()))).astype(np.int16)
    return replace(phantom, hu=hu)


def write_dicom(case: SeriesCase, folder: Path, series_uid: str | None = None,
                roi_centres: list[list[int]] | None = None) -> list[Path]:
    """Write the case as a DICOM series stored as ``case.storage`` says; returns the files. A lesion case needs
    the ROI centres the node chose on the series without the lesion (``roi_centres``); without them it is written
    without the lesion (the first pass)."""
    phantom = case.make()
    if case.lesion and roi_centres is not None:
        phantom = _lesion_on_source(phantom, roi_centres)
    flips, honest, position = STORAGES[case.storage]
    description = f"CHEST WO CONTRAST {case.group}"
    paths = write_ct_series(phantom, folder, feet_first=flips[0], series_uid=series_uid,
                            series_description=description, overrides={"PatientPosition": position})
    if flips[1] or flips[2]:
        _restore(paths, flip_x=flips[2], flip_y=flips[1], honest=honest)
    return paths


def _restore(paths: list[Path], *, flip_x: bool, flip_y: bool, honest: bool) -> None:
    """Store every slice mirrored (columns ``flip_x``, rows ``flip_y``); an honest header follows (IOP negated,
    IPP moved: the same patient geometry), a lying one keeps its orientation (the patient mirrored)."""
    for path in paths:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
        row_dir = np.array([float(v) for v in ds.ImageOrientationPatient[:3]])
        col_dir = np.array([float(v) for v in ds.ImageOrientationPatient[3:]])
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        if flip_x:
            arr = arr[:, ::-1]
            if honest:
                ipp = ipp + row_dir * (arr.shape[1] - 1) * float(ds.PixelSpacing[1])
                row_dir = -row_dir
        if flip_y:
            arr = arr[::-1, :]
            if honest:
                ipp = ipp + col_dir * (arr.shape[0] - 1) * float(ds.PixelSpacing[0])
                col_dir = -col_dir
        ds.PixelData = np.ascontiguousarray(arr).tobytes()
        ds.ImageOrientationPatient = [float(v) + 0.0 for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [float(v) for v in ipp]
        ds.save_as(path, enforce_file_format=True)
