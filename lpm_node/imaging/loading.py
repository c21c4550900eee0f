"""DICOM CT series -> HU volume (SimpleITK image in LPS) with its source geometry.

Handles unsorted files, any slice order and axial orientation sign, per-frame rescale, pixel padding,
single-frame and multi-frame (Enhanced CT) objects and every transfer syntax pydicom can decode
(pylibjpeg plugins for JPEG, JPEG 2000, RLE). Missing slices or uneven spacing are detected: small gaps are
bridged by linear interpolation along the slice normal (with a warning), larger ones are refused. Gantry
tilt, mixed orientations and mixed image sizes are refused with a reason.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.pixels.utils import as_pixel_options

from lpm_node.core.files import bytes_checksum
from lpm_node.core.frames import frame_rescale, frame_value, number_of_frames
from lpm_node.imaging.arrays import CAN_FILL, image_fits, image_from_array, new_image

__all__ = ["SeriesLoadError", "CTSeries", "find_series", "load_series", "HU_AIR"]

log = logging.getLogger(__name__)

HU_AIR = -1024.0
_ORIENT_TOL = 1e-3  # direction cosines
_HEADER_TAGS = ["SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality"]


class SeriesLoadError(ValueError):
    """A series that cannot be turned into a volume; the message is a human-readable reason."""


@dataclass
class CTSeries:
    """A loaded series: HU image (int16 or float32) on the source grid plus the source datasets.

    ``image`` index i is the DICOM column, j the row and k the sorted slice order; ``frame_refs[k]`` is
    (index into ``datasets``, 0-based frame number) of the source frame of slice k, or (-1, -1) for a
    slice interpolated across a gap.
    """

    image: sitk.Image
    datasets: list[Dataset]
    frame_refs: list[tuple[int, int]]
    series_instance_uid: str
    study_instance_uid: str
    warnings: list[str] = field(default_factory=list)
    checksums: dict[str, str] = field(default_factory=dict)  # path -> SHA-256 of the bytes read (when asked)


@dataclass
class _Frame:
    ds_index: int
    frame: int
    position: np.ndarray  # IPP (3,)
    orientation: np.ndarray  # IOP (6,)
    spacing: tuple[float, float]  # (row spacing, column spacing)
    slope: float
    intercept: float


# ------------------------------------------------------------------------------------------------ discovery


def _read_header(path: Path) -> Dataset | None:
    """Header of a DICOM file, or None for anything that is not a DICOM image instance."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except InvalidDicomError:
        try:  # files without the 128-byte preamble
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS, force=True)
        except Exception:  # noqa: BLE001 - anything unreadable is skipped
            return None
        return ds if "SOPInstanceUID" in ds and "SeriesInstanceUID" in ds else None
    except Exception:  # noqa: BLE001
        return None


def find_series(root: str | Path) -> dict[str, list[Path]]:
    """Map SeriesInstanceUID -> sorted file paths for the DICOM files under ``root`` (headers only).

    Non-DICOM files, DICOMDIRs and files without a SeriesInstanceUID are skipped.
    """
    root = Path(root)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    series: dict[str, list[Path]] = {}
    for path in files:
        if path.name.upper() == "DICOMDIR":
            continue
        ds = _read_header(path)
        if ds is None:
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if uid:
            series.setdefault(uid, []).append(path)
    return series


# ------------------------------------------------------------------------------------------------ geometry


def _floats(value: Any, n: int, what: str) -> np.ndarray:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SeriesLoadError(f"invalid {what}: {value!r}") from exc
    if arr.shape != (n,):
        raise SeriesLoadError(f"invalid {what}: {value!r}")
    return arr


def _frames_of(ds: Dataset, ds_index: int) -> list[_Frame]:
    """Geometry and rescale of every frame of one dataset."""
    frames: list[_Frame] = []
    for f in range(number_of_frames(ds)):
        ipp = frame_value(ds, f, "PlanePositionSequence", "ImagePositionPatient")
        iop = frame_value(ds, f, "PlaneOrientationSequence", "ImageOrientationPatient")
        ps = frame_value(ds, f, "PixelMeasuresSequence", "PixelSpacing")
        slope, intercept = frame_rescale(ds, f)
        if ipp is None or iop is None:
            raise SeriesLoadError(f"instance {ds.get('SOPInstanceUID', ds_index)} frame {f + 1} has no image "
                                  "position/orientation (not a cross-sectional image)")
        if ps is None:
            raise SeriesLoadError(f"instance {ds.get('SOPInstanceUID', ds_index)} has no PixelSpacing")
        spacing = _floats(ps, 2, "PixelSpacing")
        frames.append(_Frame(
            ds_index=ds_index, frame=f, position=_floats(ipp, 3, "ImagePositionPatient"),
            orientation=_floats(iop, 6, "ImageOrientationPatient"), spacing=(float(spacing[0]), float(spacing[1])),
            slope=slope, intercept=intercept,
        ))
    return frames


def _check_uniform(frames: list[_Frame], datasets: list[Dataset]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Common row/column/normal directions; refuses mixed orientations, sizes or pixel spacings."""
    iop0 = frames[0].orientation
    for fr in frames[1:]:
        if np.abs(fr.orientation - iop0).max() > _ORIENT_TOL:
            raise SeriesLoadError(
                f"mixed image orientations in the series ({_fmt(iop0)} and {_fmt(fr.orientation)})")
        if np.abs(np.subtract(fr.spacing, frames[0].spacing)).max() > 1e-3:
            raise SeriesLoadError(f"mixed pixel spacings in the series ({frames[0].spacing} and {fr.spacing})")
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(sizes) > 1:
        raise SeriesLoadError(f"mixed image sizes in the series: {sorted(sizes)}")
    row, col = iop0[:3], iop0[3:]
    if abs(np.linalg.norm(row) - 1) > 0.01 or abs(np.linalg.norm(col) - 1) > 0.01 or abs(row @ col) > 0.01:
        raise SeriesLoadError(f"invalid ImageOrientationPatient {_fmt(iop0)}")
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    return row, col, normal / np.linalg.norm(normal)


def _nominal_thickness(ds: Dataset) -> float:
    """Slice spacing to use for a single-slice series: SpacingBetweenSlices, else SliceThickness, else 1 mm."""
    for kw in ("SpacingBetweenSlices", "SliceThickness"):
        try:
            v = float(frame_value(ds, 0, "PixelMeasuresSequence", kw) or 0)
        except (TypeError, ValueError):
            v = 0.0
        if v > 0:
            return v
    return 1.0


def _fmt(v: np.ndarray) -> str:
    return "[" + ", ".join(f"{x:.3g}" for x in v) + "]"


@dataclass
class _Plan:
    order: list[int]  # frame indices, sorted along the normal
    positions: np.ndarray  # positions along the normal of the sorted frames (mm)
    step: float  # slice spacing of the output grid (mm)
    n_out: int  # number of output slices


def _plan_slices(
    frames: list[_Frame], row: np.ndarray, col: np.ndarray, normal: np.ndarray, pixel_spacing: tuple[float, float],
    max_gap_factor: float, max_gap_mm: float, warnings: list[str], single_step: float = 1.0,
) -> _Plan:
    """Sort frames along the normal; check tilt, duplicates and gaps; choose the output slice grid."""
    pos = np.array([fr.position for fr in frames])
    s = pos @ normal
    order = list(np.argsort(s, kind="stable"))
    s_sorted = s[order]
    if len(frames) == 1:
        return _Plan(order=order, positions=s_sorted, step=single_step, n_out=1)
    d = np.diff(s_sorted)
    if (d < 1e-3).any():
        i = int(np.argmin(d))
        raise SeriesLoadError(
            f"several images at the same slice position ({s_sorted[i]:.2f} mm along the slice normal): "
            "more than one acquisition or stack in the series")
    # Gantry tilt: the in-plane drift of the image origin along the stack.
    p_sorted = pos[order]
    rel = p_sorted - p_sorted[0]
    drift = np.stack([rel @ row / pixel_spacing[1], rel @ col / pixel_spacing[0]], axis=1)
    max_drift = float(np.abs(drift).max())
    if max_drift > 0.5:
        span = float(s_sorted[-1] - s_sorted[0])
        inplane = float(np.linalg.norm(rel[-1] - (rel[-1] @ normal) * normal))
        angle = float(np.degrees(np.arctan2(inplane, span)))
        raise SeriesLoadError(
            f"gantry tilt of {angle:.1f} degrees (slices shift {max_drift:.1f} pixels in-plane across the series); "
            "tilted acquisitions are not supported")
    step = float(np.median(d))
    tol = max(0.01 * step, 0.01)
    if np.abs(d - step).max() <= tol:
        return _Plan(order=order, positions=s_sorted, step=step, n_out=len(order))
    gap_i = int(np.argmax(d))
    gap = float(d[gap_i])
    where = f"between {s_sorted[gap_i]:.2f} and {s_sorted[gap_i + 1]:.2f} mm"
    if gap > max_gap_factor * step + tol or gap > max_gap_mm:
        raise SeriesLoadError(
            f"gap of {gap:.2f} mm in the slice positions {where} (nominal spacing {step:.2f} mm): "
            "missing slices")
    span = float(s_sorted[-1] - s_sorted[0])
    n_out = int(round(span / step)) + 1
    out_step = span / (n_out - 1)
    n_missing = n_out - len(order)
    what = f"{n_missing} missing slice(s)" if n_missing > 0 else "uneven slice spacing"
    warnings.append(
        f"{what}: largest gap {gap:.2f} mm {where} (nominal {step:.2f} mm); "
        f"interpolated linearly onto a {out_step:.3f} mm grid")
    return _Plan(order=order, positions=s_sorted, step=out_step, n_out=n_out)


# ------------------------------------------------------------------------------------------------ pixels


def _parse(data: bytes, path: Path, *, stop_before_pixels: bool) -> tuple[Dataset, int]:
    """Dataset in ``data`` (the bytes of ``path``) and the offset where parsing stopped."""
    name = path.name
    for force in (False, True):  # force: files without the 128-byte preamble
        buf = io.BytesIO(data)
        try:
            ds = pydicom.dcmread(buf, stop_before_pixels=stop_before_pixels, force=force)
            # as if read from the path: the dataset must not keep the file's bytes alive
            ds.buffer, ds.filename, ds.fileobj_type = None, str(path), open
            break
        except InvalidDicomError as exc:
            error: Exception = exc
        except Exception as exc:  # noqa: BLE001
            raise SeriesLoadError(f"{name}: not a readable DICOM file ({exc})") from exc
    else:
        raise SeriesLoadError(f"{name}: not a readable DICOM file ({error})") from error
    if "TransferSyntaxUID" not in ds.file_meta:
        # raw dataset without file meta information: use the encoding it was read with
        implicit, little = ds.original_encoding
        if implicit is None:
            raise SeriesLoadError(f"{name}: not a readable DICOM file")
        ds.file_meta.TransferSyntaxUID = (
            pydicom.uid.ImplicitVRLittleEndian if implicit
            else pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian
        )
    return ds, buf.tell()


def _read_file(
    path: Path, keep_pixel_data: bool, on_bytes: Callable[[bytes], object] | None = None
) -> tuple[Dataset, np.ndarray | None]:
    """A file's dataset, read once; without ``keep_pixel_data`` also its native pixel data as stored frames.
    ``on_bytes`` is handed the file's bytes as read.

    The stored frames (frames, rows, cols) are decoded in place from the file's bytes when the pixel data are
    native little-endian and end the file; the dataset then stops before them. Otherwise the whole file is
    parsed and None is returned for the frames.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SeriesLoadError(f"{path.name}: not a readable DICOM file ({exc})") from exc
    if on_bytes is not None:
        on_bytes(data)
    if not keep_pixel_data:
        ds, offset = _parse(data, path, stop_before_pixels=True)
        stored = _native_frames(ds, data, offset)
        if stored is not None:
            return ds, stored
    return _parse(data, path, stop_before_pixels=False)[0], None


_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian


def _native_frames(ds: Dataset, data: bytes, offset: int) -> np.ndarray | None:
    """Stored frames of the native little-endian Pixel Data element at ``offset`` if it ends ``data``, else None.

    Decoded by pydicom's native decoder as a view of ``data`` where no bit correction is needed.
    """
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax.is_encapsulated or syntax.is_deflated or not syntax.is_little_endian:
        return None
    if len(data) < offset + 12 or data[offset:offset + 4] != _PIXEL_DATA_TAG:
        return None
    if syntax.is_implicit_VR:
        start = offset + 8
        (length,) = struct.unpack_from("<I", data, offset + 4)
    else:
        if data[offset + 4:offset + 8] not in (b"OB\0\0", b"OW\0\0"):
            return None
        start = offset + 12
        (length,) = struct.unpack_from("<I", data, offset + 8)
    if start + length != len(data):  # undefined length or elements after the pixel data
        return None
    try:
        layout = _pixel_layout(ds, syntax)
        if layout is None:
            return None
        options, dtype = layout
        shape = (int(options["number_of_frames"]), int(options["rows"]), int(options["columns"]))
        if dtype is not None and length == dtype.itemsize * shape[0] * shape[1] * shape[2]:
            # what pydicom's native decoder returns for this layout (a view), without its per-file checks
            return np.frombuffer(data, dtype=dtype, count=length // dtype.itemsize, offset=start).reshape(shape)
        view = options["bits_stored"] == options["bits_allocated"]  # else a corrected copy
        arr, _ = get_decoder(syntax).as_array(
            memoryview(data)[start:], pixel_keyword="PixelData", view_only=view, raw=True, **options)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None  # the whole-file path reports what is wrong
    return arr.reshape(shape)


_PIXEL_MODULE = ("SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration", "NumberOfFrames", "Rows",
                 "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation")
_layouts: dict[tuple[Any, ...], tuple[dict[str, Any], np.dtype | None] | None] = {}
_layouts_lock = threading.Lock()


def _pixel_layout(ds: Dataset, syntax: Any) -> tuple[dict[str, Any], np.dtype | None] | None:
    """pydicom's pixel options for ``ds`` and, where the stored values can be viewed as they are (8/16/32-bit,
    all bits stored), their little-endian dtype; None for anything but one sample per pixel.

    Worked out once per distinct pixel module (the raw bytes of its attributes), not once per file."""
    key = (str(syntax), *(_raw(ds, kw) for kw in _PIXEL_MODULE))
    with _layouts_lock:
        if key in _layouts:
            return _layouts[key]
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        layout = None
    else:
        options = as_pixel_options(ds)
        bits, stored = int(options["bits_allocated"]), int(options["bits_stored"])
        signed = int(options["pixel_representation"]) == 1
        dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}") if bits in (8, 16, 32) and stored == bits else None
        layout = (options, dtype)
    with _layouts_lock:
        if len(_layouts) > 64:
            _layouts.clear()
        _layouts[key] = layout
    return layout


def _raw(ds: Dataset, keyword: str) -> object:
    """An attribute's raw bytes (or its value once converted) as a hashable cache key part."""
    elem = ds.get_item(keyword)
    if elem is None:
        return None
    value = elem.value
    return value if isinstance(value, bytes) else repr(value)


def _stored_pixels(ds: Dataset) -> np.ndarray:
    """Stored pixel values as (frames, rows, cols), decoding compressed data when needed."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    n = number_of_frames(ds)
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise SeriesLoadError("colour images are not CT")
    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    bits = int(ds.BitsAllocated)
    simple = (
        tsyntax is not None and not tsyntax.is_compressed and tsyntax.is_little_endian
        and bits in (8, 16, 32) and int(ds.BitsStored) == bits and "PixelData" in ds
    )
    if simple:
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        dtype = np.dtype(f"{'i' if signed else 'u'}{bits // 8}").newbyteorder("<")
        raw = ds.PixelData
        need = rows * cols * n * dtype.itemsize
        if len(raw) >= need:
            return np.frombuffer(raw, dtype=dtype, count=rows * cols * n).reshape(n, rows, cols)
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001
        syntax = tsyntax.name if tsyntax is not None else "unknown transfer syntax"
        raise SeriesLoadError(f"cannot decode pixel data ({syntax}): {exc}") from exc
    return arr.reshape(n, rows, cols)


def stored_to_hu(stored: np.ndarray, slope: float, intercept: float, out: np.ndarray) -> None:
    """out = max(stored * slope + intercept, -1024) in float32 (or int16, capped at 32767), in few passes."""
    if out.dtype == np.int16:  # slope 1, whole-HU intercept
        shift = int(intercept)
        limits, kind = np.iinfo(np.int16), np.iinfo(stored.dtype)
        # a bound is looked for (one pass) only where the stored type allows values beyond what is safe
        low = int(stored.min()) if kind.min + shift < HU_AIR else kind.min
        high = int(stored.max()) if max(kind.max, kind.max + shift) > limits.max else kind.max
        if high <= limits.max and high + shift <= limits.max and low + shift >= limits.min:
            # exact: every stored value and its HU fit int16
            np.add(stored, np.int16(shift), out=out, dtype=np.int16, casting="unsafe")
            if low + shift < HU_AIR:
                np.maximum(out, np.int16(HU_AIR), out=out)
            return
        wide = stored.astype(np.int32)
        wide += shift
        np.clip(wide, int(HU_AIR), np.iinfo(np.int16).max, out=wide)
        out[...] = wide
        return
    if slope == 1.0:
        np.add(stored, np.float32(intercept), out=out, dtype=np.float32)
    else:
        np.multiply(stored, np.float32(slope), out=out, dtype=np.float32)
        if intercept:
            out += np.float32(intercept)
    lowest = float(stored.min()) * slope + intercept if slope > 0 else float(stored.max()) * slope + intercept
    if lowest < HU_AIR:
        np.maximum(out, np.float32(HU_AIR), out=out)


def _padding_mask(ds: Dataset, stored: np.ndarray) -> np.ndarray | None:
    """Stored pixels equal to PixelPaddingValue (or within the padding range), or None."""
    pad = ds.get("PixelPaddingValue")
    if pad is None:
        return None
    lim = ds.get("PixelPaddingRangeLimit")
    pad = int(pad)
    if int(ds.get("PixelRepresentation", 0)) == 1 and pad >= 2 ** (int(ds.BitsAllocated) - 1):
        pad -= 2 ** int(ds.BitsAllocated)  # signed value read as unsigned (US vs SS ambiguity)
    if lim is None:
        return stored == pad
    lim = int(lim)
    lo, hi = min(pad, lim), max(pad, lim)
    return (stored >= lo) & (stored <= hi)


# ------------------------------------------------------------------------------------------------ loading


def load_series(
    paths: Sequence[str | Path], *, max_gap_factor: float = 2.0, max_gap_mm: float = 10.0, workers: int | None = None,
    keep_pixel_data: bool = True, checksums: bool = False,
) -> CTSeries:
    """Load one DICOM series into a HU image on its own (sorted) grid.

    With ``checksums`` the SHA-256 of each file's bytes, as read and parsed, is in ``CTSeries.checksums`` (hashed in
    a thread while the next files are parsed): what was measured can be checked against what was received without
    reading the files again.

    The image is int16 when the stored values map to whole HU (slope 1, integer intercept: nearly all CT; values
    capped at 32767), float32 otherwise or when slices were interpolated across a gap.

    With ``keep_pixel_data=False`` the datasets keep their headers only (the pixels are in ``image``), which
    saves the memory of a second copy of the series.

    Slices with a gap up to ``max_gap_factor`` times the nominal spacing (and at most ``max_gap_mm``) are
    interpolated with a warning; larger gaps, gantry tilt, mixed orientations or sizes raise
    :class:`SeriesLoadError`. Padding pixels and anything below -1024 HU become -1024 HU (air).
    Malformed headers are reported as :class:`SeriesLoadError` too.
    """
    if not paths:
        raise SeriesLoadError("no files")
    try:
        return _load(paths, max_gap_factor, max_gap_mm, workers, keep_pixel_data, checksums)
    except SeriesLoadError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise SeriesLoadError(f"malformed series ({type(exc).__name__}: {exc})") from exc


def _load(
    paths: Sequence[str | Path], max_gap_factor: float, max_gap_mm: float, workers: int | None, keep_pixel_data: bool,
    checksums: bool = False,
) -> CTSeries:
    workers = workers or min(4, os.cpu_count() or 1)
    files = [Path(p) for p in paths]
    # Parsing holds the interpreter lock, so files are read one after the other (decoding below runs in threads);
    # meanwhile the image is allocated (zero-filled by SimpleITK, without the lock) for the likely series grid, and
    # each file's bytes are hashed (hashlib releases the lock).
    digests: dict[str, Future[str]] = {}
    with ThreadPoolExecutor(max_workers=1) as ahead:

        def read_one(path: Path) -> tuple[Dataset, np.ndarray | None]:
            if not checksums:
                return _read_file(path, keep_pixel_data)
            return _read_file(path, keep_pixel_data,
                              lambda data: digests.__setitem__(str(path), ahead.submit(bytes_checksum, data)))

        read = [read_one(files[0])]
        guess = _grid_guess(read[0][0], len(files)) if CAN_FILL else None
        allocating = ahead.submit(new_image, *guess) if guess is not None else None
        read += [read_one(p) for p in files[1:]]
    spare = allocating.result() if allocating is not None else None
    del allocating
    file_checksums = {path: digest.result() for path, digest in digests.items()}
    datasets, native = _dedupe(read)
    del read
    uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(uids) > 1:
        raise SeriesLoadError(f"files from {len(uids)} different series")
    for ds, stored in zip(datasets, native, strict=True):
        if stored is None and "PixelData" not in ds and "FloatPixelData" not in ds:
            raise SeriesLoadError(f"instance {ds.get('SOPInstanceUID', '?')} has no pixel data")
    warnings: list[str] = []
    frames = [fr for i, ds in enumerate(datasets) for fr in _frames_of(ds, i)]
    row, col, normal = _check_uniform(frames, datasets)
    pixel_spacing = frames[0].spacing
    plan = _plan_slices(frames, row, col, normal, pixel_spacing, max_gap_factor, max_gap_mm, warnings,
                        _nominal_thickness(datasets[0]))
    hu_type = _hu_type(frames, datasets)
    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    out_type = hu_type if plan.n_out == len(plan.order) else np.float32
    if spare is not None and not image_fits(spare, (plan.n_out, rows, cols), out_type):
        spare = None
    src = np.empty((len(frames), rows, cols), dtype=hu_type)
    padded = _decode_sorted(datasets, native, frames, plan.order, src, workers, keep_pixel_data)
    if padded:
        warnings.append(f"pixel padding set to {HU_AIR:.0f} HU on {padded} frame(s)")

    sorted_refs = [(frames[i].ds_index, frames[i].frame) for i in plan.order]
    if plan.n_out == len(plan.order):
        vol, refs = src, sorted_refs
    else:
        vol, refs = _interpolate_slices(src, plan, sorted_refs)
        src = vol

    first = frames[plan.order[0]].position
    image = image_from_array(vol, spare)
    del vol, src, spare
    image.SetOrigin(tuple(float(v) for v in first))
    image.SetSpacing((pixel_spacing[1], pixel_spacing[0], float(plan.step)))
    direction = np.column_stack([row, col, normal])
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    ds0 = datasets[0]
    for w in warnings:
        log.warning("series %s: %s", ds0.get("SeriesInstanceUID", "?"), w)
    return CTSeries(
        image=image,
        datasets=datasets,
        frame_refs=refs,
        series_instance_uid=str(ds0.get("SeriesInstanceUID", "")),
        study_instance_uid=str(ds0.get("StudyInstanceUID", "")),
        warnings=warnings,
        checksums=file_checksums,
    )


def _hu_type(frames: list[_Frame], datasets: list[Dataset]) -> type[np.int16] | type[np.float32]:
    """int16 when every frame maps stored values to whole HU (slope 1, integer intercept: nearly all CT), which
    halves memory and copies; float32 otherwise."""
    whole_hu = all(fr.slope == 1.0 and float(fr.intercept).is_integer() for fr in frames) and not any(
        "FloatPixelData" in ds or "DoubleFloatPixelData" in ds for ds in datasets
    )
    return np.int16 if whole_hu else np.float32


def _grid_guess(ds: Dataset, n_files: int) -> tuple[tuple[int, int, int], type[np.int16] | type[np.float32]] | None:
    """Likely (slices, rows, cols) and HU type of ``n_files`` files like ``ds``; None where ``ds`` does not say."""
    try:
        frames = _frames_of(ds, 0)
        return (n_files * len(frames), int(ds.Rows), int(ds.Columns)), _hu_type(frames, [ds])
    except (SeriesLoadError, AttributeError, KeyError, TypeError, ValueError):
        return None


def _decode_sorted(
    datasets: list[Dataset], native: list[np.ndarray | None], frames: list[_Frame], order: list[int],
    src: np.ndarray, workers: int, keep_pixel_data: bool = True,
) -> int:
    """Fill ``src`` (int16 or float32) with the HU of every frame, stacked in ``order``; the number of frames with
    padding.

    ``native[i]`` holds the stored frames of ``datasets[i]`` when they were read with its header, else None.
    Without ``keep_pixel_data`` each dataset's pixel data is dropped as soon as it is decoded."""
    slot = {frame_i: k for k, frame_i in enumerate(order)}
    frame_start = np.cumsum([0] + [number_of_frames(ds) for ds in datasets])

    def fill(i: int) -> int:
        ds = datasets[i]
        stored = native[i] if native[i] is not None else _stored_pixels(ds)
        native[i] = None  # frees the file's bytes once decoded
        pad = _padding_mask(ds, stored)
        n_padded = 0
        for f in range(stored.shape[0]):
            fr = frames[frame_start[i] + f]
            out = src[slot[frame_start[i] + f]]
            stored_to_hu(stored[f], fr.slope, fr.intercept, out)
            if pad is not None and pad[f].any():
                out[pad[f]] = HU_AIR
                n_padded += 1
        if not keep_pixel_data:
            del stored
            for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
                if keyword in ds:
                    delattr(ds, keyword)
        return n_padded

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return sum(pool.map(fill, range(len(datasets))))


def _dedupe(files: list[tuple[Dataset, np.ndarray | None]]) -> tuple[list[Dataset], list[np.ndarray | None]]:
    """Drop repeated copies of the same SOP instance; the datasets and their stored frames."""
    seen: set[str] = set()
    datasets: list[Dataset] = []
    native: list[np.ndarray | None] = []
    for ds, stored in files:
        uid = str(ds.get("SOPInstanceUID", ""))
        if uid and uid in seen:
            continue
        seen.add(uid)
        datasets.append(ds)
        native.append(stored)
    return datasets, native


def _interpolate_slices(
    src: np.ndarray, plan: _Plan, refs: list[tuple[int, int]]
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Linear interpolation of the sorted slices onto a uniform grid along the normal."""
    s = plan.positions
    grid = s[0] + plan.step * np.arange(plan.n_out)
    grid[-1] = s[-1]
    out = np.empty((plan.n_out, *src.shape[1:]), dtype=np.float32)
    out_refs: list[tuple[int, int]] = []
    tol = 0.01 * plan.step
    for k, z in enumerate(grid):
        j = int(np.clip(np.searchsorted(s, z, side="right") - 1, 0, len(s) - 2))
        w = float((z - s[j]) / (s[j + 1] - s[j]))
        if abs(z - s[j]) <= tol:
            out[k] = src[j]
            out_refs.append(refs[j])
        elif abs(z - s[j + 1]) <= tol:
            out[k] = src[j + 1]
            out_refs.append(refs[j + 1])
        else:
            np.multiply(src[j], np.float32(1.0 - w), out=out[k])
            out[k] += np.float32(w) * src[j + 1]
            out_refs.append((-1, -1))
    return out, out_refs
