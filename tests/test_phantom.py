"""The CT phantom: ground truth, anatomy placement, DICOM series validity (pydicom, dcmdump, dciodvfy)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from lpm_node.demo.phantom import Phantom, make_phantom, save_masks_nifti, write_ct_series

SMALL = {"size": 256, "pixel_spacing": 1.4}


@pytest.fixture(scope="module")
def small() -> Phantom:
    return make_phantom(33.0, n_slices=64, lesion=True, seed=3, **SMALL)


def test_parenchyma_mean_is_the_true_attenuation(small: Phantom) -> None:
    par = small.masks["liver_parenchyma"].astype(bool)
    values = small.hu[par].astype(np.float64)
    assert values.size > 10000
    sem = 12.0 / np.sqrt(values.size)
    assert abs(values.mean() - 33.0) < 5 * sem + 0.05
    assert 10.0 < values.std() < 14.0
    assert small.liver_hu == 33.0
    spleen = small.hu[small.masks["spleen"].astype(bool)].astype(np.float64)
    assert abs(spleen.mean() - 50.0) < 1.0


def test_masks_are_consistent(small: Phantom) -> None:
    m = {k: v.astype(bool) for k, v in small.masks.items()}
    assert set(m) >= {"liver", "spleen", "body", "liver_parenchyma"}
    for v in small.masks.values():
        assert v.dtype == np.uint8 and v.shape == small.hu.shape
    assert not (m["liver_parenchyma"] & ~m["liver"]).any()
    assert not (m["liver"] & ~m["body"]).any()
    assert not (m["liver"] & m["spleen"]).any()
    # vessels and the lesion are inside the liver but not parenchyma
    assert (m["liver"] & ~m["liver_parenchyma"]).sum() > 500
    assert (small.hu[~m["body"]] < -900).mean() > 0.95


def test_liver_on_the_right_spleen_on_the_left(small: Phantom) -> None:
    x = small.origin[0] + small.spacing[2] * np.arange(small.hu.shape[2])
    liver_x = x[np.nonzero(small.masks["liver"])[2]].mean()
    spleen_x = x[np.nonzero(small.masks["spleen"])[2]].mean()
    assert liver_x < -30.0 < 30.0 < spleen_x  # LPS: the patient's right has negative x
    # lungs above the liver, liver at the bottom
    z_liver = np.nonzero(small.masks["liver"].any(axis=(1, 2)))[0]
    assert z_liver.min() < 10 and z_liver.max() < small.hu.shape[0] - 10
    top = small.hu[-1][small.masks["body"][-1].astype(bool)]
    assert (top < -700).mean() > 0.2


@pytest.mark.parametrize("seed", [0, 1, 2, 5, 8])
def test_roi_region_is_pure_parenchyma(seed: int) -> None:
    """The DL-parenchymal ROI (21 mm medial to the lateral edge) on the truth mask contains no vessel/lesion."""
    ph = make_phantom(45.0, n_slices=70, lesion=True, seed=seed, noise_sd=0.0, **SMALL)
    liver, par = ph.masks["liver"].astype(bool), ph.masks["liver_parenchyma"].astype(bool)
    ps = ph.spacing[2]
    k = int(liver.sum(axis=(1, 2)).argmax())
    assert 2 <= k < ph.hu.shape[0] - 2
    yy, xx = np.mgrid[: liver.shape[1], : liver.shape[2]]
    for kk in (k - 2, k, k + 2):
        cols = np.nonzero(liver[kk].any(axis=0))[0]
        x_min = int(cols.min())
        y0 = int(np.nonzero(liver[kk][:, x_min])[0].min())
        cx = x_min + 21.0 / ps
        disk = (yy - y0) ** 2 + (xx - cx) ** 2 <= (8.0 / ps) ** 2
        assert par[kk][disk].all(), f"seed {seed} slice {kk}: ROI touches non-parenchyma"
        assert np.all(ph.hu[kk][disk] == 45)


def test_liver_cut_and_seed_variation() -> None:
    full = make_phantom(50.0, n_slices=30, seed=4, **SMALL)
    cut = make_phantom(50.0, n_slices=30, seed=4, liver_cut=True, **SMALL)
    assert not full.masks["liver"][0].any()
    assert cut.masks["liver"][0].sum() > 500
    other = make_phantom(50.0, n_slices=30, seed=5, **SMALL)
    assert not np.array_equal(full.masks["liver"], other.masks["liver"])
    again = make_phantom(50.0, n_slices=30, seed=4, **SMALL)
    assert np.array_equal(full.hu, again.hu)


def _read_series(paths: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in paths]


@pytest.mark.parametrize("feet_first", [False, True])
def test_written_series_geometry(small: Phantom, tmp_path: Path, feet_first: bool) -> None:
    paths = write_ct_series(small, tmp_path, feet_first=feet_first, overrides={"ContrastBolusAgent": "IOHEXOL"})
    assert len(paths) == small.hu.shape[0]
    dss = _read_series(paths)
    first = dss[0]
    assert first.SOPClassUID == pydicom.uid.CTImageStorage
    assert first.PatientPosition == ("FFS" if feet_first else "HFS")
    assert list(first.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert first.ContrastBolusAgent == "IOHEXOL"
    assert (first.Rows, first.Columns) == (256, 256)
    assert len({ds.SeriesInstanceUID for ds in dss}) == 1
    assert len({ds.SOPInstanceUID for ds in dss}) == len(dss)
    z = [float(ds.ImagePositionPatient[2]) for ds in dss]
    # instance 1 is at the head (HFS) or at the feet (FFS)
    assert (np.diff(z) > 0).all() if feet_first else (np.diff(z) < 0).all()
    for ds in dss:
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        k = int(round((float(ds.ImagePositionPatient[2]) - small.origin[2]) / small.spacing[0]))
        assert abs(float(ds.ImagePositionPatient[0]) - small.origin[0]) < 1e-3
        hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        assert np.array_equal(hu, small.hu[k])


def test_uids_deterministic_and_distinct(small: Phantom, tmp_path: Path) -> None:
    a = pydicom.dcmread(write_ct_series(small, tmp_path / "a")[0])
    b = pydicom.dcmread(write_ct_series(small, tmp_path / "b")[0])
    c = pydicom.dcmread(write_ct_series(small, tmp_path / "c", series_number=3)[0])
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.SeriesInstanceUID == b.SeriesInstanceUID
    assert c.SeriesInstanceUID != a.SeriesInstanceUID and c.StudyInstanceUID == a.StudyInstanceUID
    d = pydicom.dcmread(write_ct_series(small, tmp_path / "d", study_uid="1.2.3.4", series_uid="1.2.3.4.5")[0])
    assert (d.StudyInstanceUID, d.SeriesInstanceUID) == ("1.2.3.4", "1.2.3.4.5")


@pytest.mark.skipif(shutil.which("dcmdump") is None or shutil.which("dciodvfy") is None, reason="dcmtk/dicom3tools")
@pytest.mark.parametrize(
    "syntax",
    [pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian, pydicom.uid.RLELossless,
     pydicom.uid.JPEG2000Lossless, pydicom.uid.JPEGLSLossless, pydicom.uid.JPEGLosslessSV1],
)
def test_series_valid_for_dcmtk_and_dciodvfy(tmp_path: Path, syntax: str) -> None:
    ph = make_phantom(20.0, n_slices=4, seed=2, liver_cut=True, **SMALL)
    paths = write_ct_series(ph, tmp_path, transfer_syntax=syntax)
    ds = pydicom.dcmread(paths[1])
    assert ds.file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(ds.pixel_array.astype(np.int32) - 1024, ph.hu[2])
    dump = subprocess.run(["dcmdump", str(paths[1])], capture_output=True, text=True)
    assert dump.returncode == 0 and "(0028,1052)" in dump.stdout
    vfy = subprocess.run(["dciodvfy", str(paths[1])], capture_output=True, text=True)
    report = vfy.stdout + vfy.stderr
    assert "CTImage" in report
    assert "Error" not in report, report


def test_overrides_set_and_delete_attributes(tmp_path: Path) -> None:
    ph = make_phantom(20.0, n_slices=2, seed=2, liver_cut=True, **SMALL)
    paths = write_ct_series(ph, tmp_path, overrides={"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"],
                                                     "KVP": None, "ProtocolName": "TOPOGRAM"})
    ds = pydicom.dcmread(paths[0])
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    assert "KVP" not in ds and ds.ProtocolName == "TOPOGRAM"
    with pytest.raises(ValueError, match="not a DICOM keyword"):
        write_ct_series(ph, tmp_path / "x", overrides={"NoSuchKeyword": 1})


def test_nifti_truth_geometry(small: Phantom, tmp_path: Path) -> None:
    paths = save_masks_nifti(small, tmp_path)
    assert set(paths) == {"ct", "liver", "spleen", "body", "liver_parenchyma"}
    ct = sitk.ReadImage(str(paths["ct"]))
    assert np.allclose(ct.GetOrigin(), small.origin, atol=1e-3)
    assert np.allclose(ct.GetSpacing(), small.spacing[::-1])
    assert np.allclose(ct.GetDirection(), np.eye(3).ravel())
    assert np.array_equal(sitk.GetArrayFromImage(ct), small.hu)
    liver = sitk.GetArrayFromImage(sitk.ReadImage(str(paths["liver"])))
    assert np.array_equal(liver, small.masks["liver"])


def test_default_size_is_fast_and_realistic(tmp_path: Path) -> None:
    ph = make_phantom(60.0, n_slices=8, liver_cut=True, seed=0)
    assert ph.hu.shape == (8, 512, 512) and ph.hu.dtype == np.int16
    assert ph.spacing == (2.5, 0.7, 0.7)
    body = ph.masks["body"].astype(bool)
    assert ph.hu[body].min() >= -1024 and ph.hu.max() > 600  # bone present
    paths = write_ct_series(ph, tmp_path)
    assert paths[0].stat().st_size > 512 * 512 * 2


def test_phantom_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from lpm_node.cli import main

    assert main(["phantom", str(tmp_path), "--hu", "35", "--slices", "3", "--feet-first", "--contrast",
                 "--seed", "4"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["files"] == 3 and summary["liver_hu"] == 35.0
    files = sorted((tmp_path / "dicom").glob("*.dcm"))
    ds = pydicom.dcmread(files[0])
    assert ds.PatientPosition == "FFS" and ds.ContrastBolusAgent == "IOHEXOL"
    assert ds.SeriesInstanceUID == summary["series_instance_uid"]
    assert (tmp_path / "truth" / "liver.nii.gz").is_file()
