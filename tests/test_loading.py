"""Loading DICOM CT series: order, orientation, rescale, padding, gaps, tilt, multi-frame, compression."""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file

from lpm_node.demo.phantom import Phantom
from lpm_node.imaging.loading import SeriesLoadError, find_series, load_series
from lpm_node.imaging.resampling import resample_to_method_grid
from tests.support_phantom import (
    flip_columns,
    flip_stored,
    hu_of,
    new_uid,
    rewrite,
    set_pixels,
    small_phantom,
    write_series,
)


@pytest.fixture(scope="module")
def ph() -> Phantom:
    return small_phantom(38.0, n_slices=24, seed=7)


def _grid(ph: Phantom) -> tuple[float, float, float]:
    return (ph.spacing[2], ph.spacing[1], ph.spacing[0])


def _on_phantom_grid(image: sitk.Image, ph: Phantom) -> np.ndarray:
    out = resample_to_method_grid(image, spacing=_grid(ph))
    assert out.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert np.allclose(out.GetOrigin(), ph.origin, atol=1e-3)
    return sitk.GetArrayFromImage(out)


@pytest.mark.parametrize("feet_first", [False, True])
def test_head_first_and_feet_first_give_the_phantom(ph: Phantom, tmp_path: Path, feet_first: bool) -> None:
    paths = write_series(ph, tmp_path, feet_first=feet_first)
    random.Random(1).shuffle(paths)
    series = load_series(paths)
    assert series.warnings == []
    assert series.image.GetPixelID() == sitk.sitkInt16  # whole HU (slope 1, integer intercept)
    assert series.image.GetSize() == (128, 128, 24)
    assert len(series.frame_refs) == 24 and len(series.datasets) == 24
    # k follows the slice order: ascending z (normal of IOP [1,0,0,0,1,0] is +z)
    z = [float(series.datasets[i].ImagePositionPatient[2]) for i, _ in series.frame_refs]
    assert np.all(np.diff(z) > 0)
    arr = _on_phantom_grid(series.image, ph)
    assert np.array_equal(arr, ph.hu.astype(np.float32))
    # liver on the patient's right: low x columns
    cols = np.nonzero(ph.masks["liver"])[2]
    assert arr[ph.masks["liver"].astype(bool)].mean() == pytest.approx(38.0, abs=1.0)
    assert cols.mean() < arr.shape[2] / 2
    assert series.series_instance_uid == str(series.datasets[0].SeriesInstanceUID)
    assert series.study_instance_uid == str(series.datasets[0].StudyInstanceUID)


def test_flipped_orientation_same_patient(ph: Phantom, tmp_path: Path) -> None:
    paths = write_series(ph, tmp_path)
    flip_columns(paths)
    series = load_series(paths)
    d = np.asarray(series.image.GetDirection()).reshape(3, 3)
    assert d[0, 0] == -1.0 and d[2, 2] == -1.0  # column axis toward the right, slices sorted toward the feet
    assert np.array_equal(_on_phantom_grid(series.image, ph), ph.hu.astype(np.float32))
    # the source grid keeps the DICOM columns: voxel (i=0) is the patient's leftmost column
    src = sitk.GetArrayFromImage(series.image)
    ds0 = series.datasets[series.frame_refs[0][0]]
    assert np.array_equal(src[0], hu_of(ds0).astype(np.float32))


@pytest.mark.parametrize(("x", "y"), [(False, True), (True, True)])
def test_any_axial_orientation_sign(ph: Phantom, tmp_path: Path, x: bool, y: bool) -> None:
    paths = write_series(ph, tmp_path, feet_first=True)
    flip_stored(paths, x=x, y=y)
    series = load_series(paths)
    d = np.asarray(series.image.GetDirection()).reshape(3, 3)
    assert d[1, 1] == -1.0 and d[0, 0] == (-1.0 if x else 1.0)
    assert np.array_equal(_on_phantom_grid(series.image, ph), ph.hu.astype(np.float32))


@pytest.mark.parametrize("variant", ["slope", "signed", "per_frame"])
def test_rescale_variants(ph: Phantom, tmp_path: Path, variant: str) -> None:
    paths = write_series(ph, tmp_path)

    def edit(ds: pydicom.Dataset, i: int) -> None:
        hu = hu_of(ds)
        if variant == "slope":
            set_pixels(ds, ((hu + 1024) * 2).astype(np.uint16))
            ds.RescaleSlope, ds.RescaleIntercept = "0.5", "-1024"
        elif variant == "signed":
            set_pixels(ds, hu.astype(np.int16))
            ds.RescaleSlope, ds.RescaleIntercept = "1", "0"
        else:
            set_pixels(ds, (hu + 1024 + 10 * i).astype(np.uint16))
            ds.RescaleIntercept = str(-1024 - 10 * i)

    rewrite(paths, edit)
    assert np.array_equal(_on_phantom_grid(load_series(paths).image, ph), ph.hu.astype(np.float32))


def test_padding_becomes_air(ph: Phantom, tmp_path: Path) -> None:
    paths = write_series(ph, tmp_path)
    body = ph.masks["body"].astype(bool)
    zs = ph.z_positions()

    def edit(ds: pydicom.Dataset, _: int) -> None:
        k = int(np.argmin(np.abs(zs - float(ds.ImagePositionPatient[2]))))
        hu = hu_of(ds).astype(np.int16)
        hu[~body[k]] = -2000
        set_pixels(ds, hu)
        ds.RescaleIntercept = "0"
        ds.add_new(0x00280120, "SS", -2000)  # PixelPaddingValue, signed like the pixels

    rewrite(paths, edit)
    series = load_series(paths)
    arr = _on_phantom_grid(series.image, ph)
    assert arr.min() == -1024.0
    assert np.array_equal(arr[body], ph.hu[body].astype(np.float32))
    assert (arr[~body] == -1024.0).all()
    assert any("padding" in w for w in series.warnings)


def test_one_missing_slice_is_interpolated(ph: Phantom, tmp_path: Path) -> None:
    paths = write_series(ph, tmp_path, feet_first=True)
    paths[10].unlink()
    series = load_series(paths[:10] + paths[11:])
    assert any("missing" in w for w in series.warnings), series.warnings
    assert series.image.GetSize()[2] == 24
    assert series.frame_refs[10] == (-1, -1)
    assert all(r != (-1, -1) for k, r in enumerate(series.frame_refs) if k != 10)
    arr = _on_phantom_grid(series.image, ph)
    keep = np.ones(24, dtype=bool)
    keep[10] = False
    assert np.array_equal(arr[keep], ph.hu[keep].astype(np.float32))
    expected = (ph.hu[9].astype(np.float32) + ph.hu[11]) / 2
    assert np.allclose(arr[10], expected, atol=1e-3)


def test_large_gap_is_refused(ph: Phantom, tmp_path: Path) -> None:
    paths = write_series(ph, tmp_path, feet_first=True)
    with pytest.raises(SeriesLoadError, match=r"gap of 10\.00 mm"):
        load_series(paths[:10] + paths[13:])


def test_uneven_spacing_is_detected(ph: Phantom, tmp_path: Path) -> None:
    paths = write_series(ph, tmp_path, feet_first=True)
    rewrite(paths[12:], lambda ds, _: setattr(ds, "ImagePositionPatient",
                                               [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) + 1.0]))
    series = load_series(paths)
    assert any("uneven" in w or "missing" in w for w in series.warnings)
    assert series.image.GetSize()[2] in (24, 25)


def test_gantry_tilt_is_refused(ph: Phantom, tmp_path: Path) -> None:
    paths = write_series(ph, tmp_path, feet_first=True)
    shift = np.tan(np.radians(15.0)) * ph.spacing[0]

    def edit(ds: pydicom.Dataset, i: int) -> None:
        ipp = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [ipp[0], ipp[1] + i * shift, ipp[2]]
        ds.GantryDetectorTilt = "15"

    rewrite(paths, edit)
    with pytest.raises(SeriesLoadError, match=r"gantry tilt of 15\.0 degrees"):
        load_series(paths)


def test_mixed_orientation_size_and_duplicates_refused(ph: Phantom, tmp_path: Path) -> None:
    paths = write_series(ph, tmp_path / "a")
    rewrite(paths[3:4], lambda ds, _: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0, -1]))
    with pytest.raises(SeriesLoadError, match="mixed image orientations"):
        load_series(paths)

    paths = write_series(ph, tmp_path / "b")

    def shrink(ds: pydicom.Dataset, _: int) -> None:
        set_pixels(ds, ds.pixel_array[:64, :64].copy())
        ds.Rows = ds.Columns = 64

    rewrite(paths[5:6], shrink)
    with pytest.raises(SeriesLoadError, match="mixed image sizes"):
        load_series(paths)

    paths = write_series(ph, tmp_path / "c")
    dup = tmp_path / "c" / "dup.dcm"
    shutil.copy(paths[4], dup)
    rewrite([dup], lambda ds, _: new_uid(ds))
    with pytest.raises(SeriesLoadError, match="same slice position"):
        load_series([*paths, dup])
    # an exact duplicate (same SOP instance) is harmless
    shutil.copy(paths[4], dup)
    assert load_series([*paths, dup]).image.GetSize()[2] == 24


def test_find_series_skips_non_dicom(ph: Phantom, tmp_path: Path) -> None:
    a = write_series(ph, tmp_path / "s" / "a", series_number=2)
    b = write_series(ph, tmp_path / "s" / "b", series_number=3)
    (tmp_path / "s" / "notes.txt").write_text("not dicom")
    (tmp_path / "s" / "a" / "garbage.dcm").write_bytes(b"\x00" * 300)
    found = find_series(tmp_path / "s")
    assert len(found) == 2
    assert sorted(map(len, found.values())) == [len(a), len(b)]
    uid = str(pydicom.dcmread(a[0], stop_before_pixels=True).SeriesInstanceUID)
    assert sorted(found[uid]) == sorted(a)


@pytest.mark.parametrize(
    "syntax",
    [pydicom.uid.RLELossless, pydicom.uid.JPEG2000Lossless, pydicom.uid.JPEGLSLossless, pydicom.uid.JPEGLosslessSV1,
     pydicom.uid.ImplicitVRLittleEndian, pydicom.uid.DeflatedExplicitVRLittleEndian],
)
def test_compressed_phantom(tmp_path: Path, syntax: str) -> None:
    ph = small_phantom(20.0, n_slices=6, seed=2)
    paths = write_series(ph, tmp_path, transfer_syntax=syntax, feet_first=True)
    for keep in (True, False):
        series = load_series(paths, keep_pixel_data=keep)
        assert series.datasets[0].file_meta.TransferSyntaxUID == syntax
        assert ("PixelData" in series.datasets[0]) == keep
        assert np.array_equal(_on_phantom_grid(series.image, ph), ph.hu.astype(np.float32))


def test_legacy_converted_enhanced_ct(ph: Phantom, tmp_path: Path) -> None:
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    paths = write_series(ph, tmp_path / "single", feet_first=False)
    legacy = [pydicom.dcmread(p) for p in paths]
    mf = LegacyConvertedEnhancedCTImage(
        legacy, series_instance_uid=pydicom.uid.generate_uid(), series_number=9,
        sop_instance_uid=pydicom.uid.generate_uid(), instance_number=1,
    )
    out = tmp_path / "mf.dcm"
    mf.save_as(out)
    for keep in (True, False):
        series = load_series([out], keep_pixel_data=keep)
        assert len(series.datasets) == 1 and int(series.datasets[0].NumberOfFrames) == 24
        assert sorted(f for _, f in series.frame_refs) == list(range(24))
        assert np.array_equal(_on_phantom_grid(series.image, ph), ph.hu.astype(np.float32))


def test_pydicom_data_enhanced_ct() -> None:
    path = get_testdata_file("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    series = load_series([path])
    assert series.image.GetSize() == (512, 512, 2)
    assert series.image.GetSpacing()[2] == pytest.approx(10.0)
    d = np.asarray(series.image.GetDirection()).reshape(3, 3)
    assert d[0, 0] == -1.0  # IOP [-1, 0, 0, 0, 1, 0]
    z = [float(ds.PerFrameFunctionalGroupsSequence[f].PlanePositionSequence[0].ImagePositionPatient[2])
         for _, f in series.frame_refs]
    assert z[0] > z[1]  # sorted along the normal, which points to the feet here
    src = sitk.GetArrayFromImage(series.image)
    raw = ds.pixel_array.astype(np.float32) - 1024
    for k, (_, f) in enumerate(series.frame_refs):
        assert np.array_equal(src[k], np.maximum(raw[f], -1024))
    method = resample_to_method_grid(series.image)
    assert method.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def test_pydicom_data_jpeg2000_ct_matches_uncompressed() -> None:
    j2k = load_series([get_testdata_file("693_J2KR.dcm")])
    unc = load_series([get_testdata_file("693_UNCR.dcm")])
    assert j2k.datasets[0].file_meta.TransferSyntaxUID == pydicom.uid.JPEG2000Lossless
    a, b = sitk.GetArrayFromImage(j2k.image), sitk.GetArrayFromImage(unc.image)
    assert a.shape == (1, 512, 512)
    assert np.array_equal(a, b)
    assert -1024 <= a.min() and a.max() > 500


def test_pydicom_data_ct_small() -> None:
    series = load_series([get_testdata_file("CT_small.dcm")])
    ds = series.datasets[0]
    assert series.image.GetSize() == (128, 128, 1)
    assert np.allclose(series.image.GetOrigin(), [float(v) for v in ds.ImagePositionPatient])
    expected = np.maximum(ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept),
                          -1024)
    assert np.array_equal(sitk.GetArrayFromImage(series.image)[0], expected)


def test_unreadable_or_empty_refused(tmp_path: Path) -> None:
    with pytest.raises(SeriesLoadError):
        load_series([])
    bad = tmp_path / "x.dcm"
    bad.write_bytes(b"garbage")
    with pytest.raises(SeriesLoadError):
        load_series([bad])


def test_raw_datasets_without_meta_header(tmp_path: Path) -> None:
    """Files holding only the dataset (no preamble, no file meta) are found and loaded."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ph = small_phantom(20.0, n_slices=4, seed=5)
    paths = write_series(ph, tmp_path, transfer_syntax=pydicom.uid.ImplicitVRLittleEndian)
    for p in paths:
        ds = pydicom.dcmread(p)
        del ds.file_meta
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, True
        write_dataset(fp, ds)
        p.write_bytes(fp.getvalue())
    assert paths[0].read_bytes()[128:132] != b"DICM"
    assert sorted(next(iter(find_series(tmp_path).values()))) == sorted(paths)
    series = load_series(paths)
    assert np.array_equal(_on_phantom_grid(series.image, ph), ph.hu.astype(np.float32))


def test_malformed_header_is_a_load_error(ph: Phantom, tmp_path: Path) -> None:
    paths = write_series(ph, tmp_path)
    rewrite(paths[2:3], lambda ds, _: delattr(ds, "Rows"))
    with pytest.raises(SeriesLoadError, match="malformed series|Rows"):
        load_series(paths)


@pytest.mark.parametrize(
    ("stored", "intercept"),
    [
        (np.array([[-32768, -2000, 0, 3000]], np.int16), -1024),  # padding-like values must not wrap around
        (np.array([[0, 1000, 65535, 40000]], np.uint16), -1024),  # beyond int16: capped at 32767
        (np.array([[0, 5, 2000]], np.uint16), 0),
        (np.array([[0, 5, 2000, 32767]], np.uint16), 0),
        (np.array([[0, 5, 2000, 32767]], np.uint16), 1),  # one above the int16 limit: capped
        (np.array([[0, 17, 255]], np.uint8), -1024),
        (np.array([[-5000, -1024, 0, 3000]], np.int32), 0),
        (np.array([[0, 40000, 70000]], np.uint32), -1024),
        (np.array([[-1024, 0, 3000]], np.int16), 24),
    ],
)
def test_whole_hu_conversion_to_int16_clips_and_never_wraps(stored: np.ndarray, intercept: int) -> None:
    from lpm_node.imaging.loading import stored_to_hu

    out = np.empty(stored.shape, np.int16)
    stored_to_hu(stored, 1.0, intercept, out)
    assert np.array_equal(out, np.clip(stored.astype(np.int64) + intercept, -1024, 32767))


def _twelve_bit(values: np.ndarray, signed: bool) -> np.ndarray:
    """12-bit stored values in 16-bit words whose unused high bits hold noise (the decoder must ignore them)."""
    words = values.astype(np.int32) & 0x0FFF
    noise = (np.arange(values.size, dtype=np.int32).reshape(values.shape) % 16) << 12
    return (words | noise).astype(np.uint16).view(np.int16 if signed else np.uint16)


@pytest.mark.parametrize(
    "variant",
    ["unsigned", "signed", "bits_stored_12", "signed_bits_stored_12", "eight_bit", "implicit", "big_endian",
     "trailing_element", "odd_padding", "padding_value"],
)
def test_pixels_read_with_the_header_match_pydicom(
    tmp_path: Path, variant: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Without kept pixel data, frames decoded from the file's bytes equal pydicom's decoding of the whole file."""
    from lpm_node.imaging.loading import _read_file

    ph = small_phantom(20.0, n_slices=3, seed=4)
    syntax = pydicom.uid.ImplicitVRLittleEndian if variant == "implicit" else pydicom.uid.ExplicitVRLittleEndian
    paths = write_series(ph, tmp_path, transfer_syntax=syntax)

    def edit(ds: pydicom.Dataset, _: int) -> None:
        hu = hu_of(ds)
        if variant == "signed":
            set_pixels(ds, hu.astype(np.int16))
            ds.RescaleIntercept = "0"
        elif variant in ("bits_stored_12", "signed_bits_stored_12"):
            signed = variant.startswith("signed")
            set_pixels(ds, _twelve_bit(hu if signed else hu + 1024, signed))
            ds.BitsStored, ds.HighBit = 12, 11
            ds.RescaleIntercept = "0" if signed else "-1024"
        elif variant == "eight_bit":
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
            ds.PixelData = np.clip((hu + 1024) // 8, 0, 255).astype(np.uint8).tobytes()
            ds.RescaleSlope, ds.RescaleIntercept = "8", "-1024"
        elif variant == "big_endian":
            ds.PixelData = ds.pixel_array.astype(">u2").tobytes()
        elif variant == "trailing_element":
            ds.add_new(0xFFFCFFFC, "OB", b"\0" * 6)  # Data Set Trailing Padding after the pixel data
        elif variant == "odd_padding":
            ds.Rows, ds.Columns = 127, 127  # 127 x 127 x 1 byte: odd length, padded to even
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
            ds.PixelData = np.clip(hu[:127, :127] + 1024, 0, 255).astype(np.uint8).tobytes() + b"\0"
        elif variant == "padding_value":
            ds.add_new(0x00280120, "US", 0)

    big = variant == "big_endian"
    if variant != "unsigned" and variant != "implicit":
        for i, p in enumerate(paths):
            ds = pydicom.dcmread(p)
            edit(ds, i)
            if big:
                ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRBigEndian
                pydicom.dcmwrite(p, ds, implicit_vr=False, little_endian=False, force_encoding=True)
            else:
                ds.save_as(p, enforce_file_format=True)
    for p in paths:
        full = pydicom.dcmread(p)
        with caplog.at_level(logging.WARNING):
            ds, stored = _read_file(p, keep_pixel_data=False)
        assert not caplog.records, caplog.text
        expected = full.pixel_array.reshape(stored.shape if stored is not None else (1, *full.pixel_array.shape))
        if stored is None:  # read whole: the dataset keeps everything, pixels are decoded later by pydicom
            assert variant in ("big_endian", "trailing_element") and "PixelData" in ds
            stored = ds.pixel_array.reshape(expected.shape)
        else:
            assert "PixelData" not in ds and ds.buffer is None and ds.filename == str(p)
            del full.PixelData
            assert ds == full
        assert stored.dtype == expected.dtype
        assert np.array_equal(stored, expected)
        if variant == "trailing_element":
            assert 0xFFFCFFFC in ds
    kept = load_series(paths)
    dropped = load_series(paths, keep_pixel_data=False)
    assert dropped.image.GetPixelID() == kept.image.GetPixelID()
    assert np.array_equal(sitk.GetArrayViewFromImage(dropped.image), sitk.GetArrayViewFromImage(kept.image))
    assert all("PixelData" not in ds for ds in dropped.datasets)


def test_image_from_array_fills_a_spare_image_only_when_it_fits() -> None:
    from lpm_node.imaging.arrays import image_from_array, new_image

    arr = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    spare = new_image((2, 3, 4), np.int16)
    assert spare.GetSize() == (4, 3, 2)
    image = image_from_array(arr, spare)
    assert image is spare
    assert np.array_equal(sitk.GetArrayViewFromImage(image), arr)
    for other in (arr.astype(np.float32), arr[:, :, :3]):  # another pixel type or size: a new image
        spare = new_image((2, 3, 4), np.int16)
        image = image_from_array(other, spare)
        assert image is not spare
        assert np.array_equal(sitk.GetArrayViewFromImage(image), other)
        assert not sitk.GetArrayViewFromImage(spare).any()


def test_grid_guess_from_the_first_file(ph: Phantom, tmp_path: Path) -> None:
    from lpm_node.imaging.loading import _grid_guess

    paths = write_series(ph, tmp_path)
    assert _grid_guess(pydicom.dcmread(paths[0]), 24) == ((24, 128, 128), np.int16)
    rewrite(paths[:1], lambda ds, _: setattr(ds, "RescaleSlope", "0.5"))
    assert _grid_guess(pydicom.dcmread(paths[0]), 5) == ((5, 128, 128), np.float32)
    rewrite(paths[:1], lambda ds, _: delattr(ds, "ImagePositionPatient"))
    assert _grid_guess(pydicom.dcmread(paths[0]), 5) is None


def test_load_fills_the_image_allocated_while_parsing(
    ph: Phantom, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lpm_node.imaging import loading

    made: list[sitk.Image] = []

    def new_image(*args: object) -> sitk.Image:
        made.append(real(*args))  # type: ignore[arg-type]
        return made[-1]

    real = loading.new_image
    monkeypatch.setattr(loading, "new_image", new_image)
    paths = write_series(ph, tmp_path, feet_first=True)
    series = load_series(paths, keep_pixel_data=False)
    assert len(made) == 1 and series.image is made[0]
    assert np.array_equal(_on_phantom_grid(series.image, ph), ph.hu.astype(np.float32))
    # one slice missing: 23 files guessed, 24 interpolated float32 slices made
    series = load_series(paths[:10] + paths[11:], keep_pixel_data=False)
    assert len(made) == 2 and series.image is not made[1]
    assert series.image.GetPixelID() == sitk.sitkFloat32 and series.image.GetSize()[2] == 24


def test_decimal_strings_in_every_spelling_give_the_same_geometry(ph: Phantom, tmp_path: Path) -> None:
    """Geometry and rescale are read from the raw decimal strings: exponents, signs, padding all parse as pydicom
    would, and a value that is not a number is still refused."""
    from pydicom.dataelem import RawDataElement

    from lpm_node.core.frames import decimal, decimals

    paths = write_series(ph, tmp_path / "a")
    reference = load_series(paths)

    def respell(ds: pydicom.Dataset, _: int) -> None:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [f"{x:+.6E}"[:16], f" {y:g}", f"{z:.5e}"]
        ds.ImageOrientationPatient = ["1.0", "0.0", "-0.0", "0", "1E0", "0"]
        ds.RescaleIntercept = "-1.024E3"
        ds.RescaleSlope = "+1.000"

    rewrite(paths, respell)
    series = load_series(paths)
    assert series.image.GetPixelID() == sitk.sitkInt16  # slope 1, whole-HU intercept, as before
    assert np.allclose(series.image.GetOrigin(), reference.image.GetOrigin(), atol=1e-4)
    assert series.image.GetSpacing() == pytest.approx(reference.image.GetSpacing(), abs=1e-5)
    assert np.array_equal(sitk.GetArrayViewFromImage(series.image), sitk.GetArrayViewFromImage(reference.image))
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert isinstance(ds.get_item("ImagePositionPatient"), RawDataElement)
    assert decimals(ds, "ImagePositionPatient") == pytest.approx([float(v) for v in ds.ImagePositionPatient])
    assert decimal(ds, "RescaleIntercept") == -1024.0 and decimal(ds, "SliceLocation") is not None
    assert decimals(ds, "SpacingBetweenSlices") is None  # absent
    data = paths[3].read_bytes()  # a position that is not a number, spelled in the file's own bytes
    other = pydicom.dcmread(paths[3], stop_before_pixels=True).get_item("ImagePositionPatient").value
    paths[3].write_bytes(data.replace(other, b"1\\abc\\3".ljust(len(other), b" "), 1))
    assert other in data
    with pytest.raises(SeriesLoadError, match="ImagePositionPatient|malformed"):
        load_series(paths)


def test_files_with_different_pixel_layouts_in_one_series(ph: Phantom, tmp_path: Path) -> None:
    """Stored layouts worked out once per distinct pixel module: unsigned, signed and 12-bit files side by side
    each decode to the phantom's HU."""
    paths = write_series(ph, tmp_path)

    def edit(ds: pydicom.Dataset, i: int) -> None:
        hu = ds.pixel_array.astype(np.int32) + int(ds.RescaleIntercept)
        if i % 3 == 1:  # signed, intercept 0
            set_pixels(ds, hu.astype(np.int16))
            ds.RescaleIntercept = "0"
        elif i % 3 == 2:  # 12 bits stored in 16, unsigned, intercept -1024
            set_pixels(ds, np.clip(hu + 1024, 0, 4095).astype(np.uint16))
            ds.BitsStored, ds.HighBit = 12, 11

    rewrite(paths, edit)
    series = load_series(paths, keep_pixel_data=False)
    expected = np.clip(ph.hu.astype(np.float32), -1024, 3071)
    assert np.array_equal(_on_phantom_grid(series.image, ph), expected)
