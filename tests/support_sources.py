"""Source CT series in the three storage classes the node accepts, written from one phantom."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.uid import UID

from lpm_node.demo.phantom import Phantom, write_ct_series

ENHANCED_CT = UID("1.2.840.10008.5.1.4.1.1.2.1")
LEGACY_CONVERTED_ENHANCED_CT = UID("1.2.840.10008.5.1.4.1.1.2.2")


def _uid(seed: str) -> UID:
    return pydicom.uid.generate_uid(entropy_srcs=[seed])


def write_multiframe(phantom: Phantom, folder: Path, *, enhanced: bool, series_number: int = 7) -> Path:
    """The phantom as one Legacy Converted Enhanced CT (highdicom's converter), or with ``enhanced`` as an
    Enhanced CT: the same functional groups under the Enhanced CT SOP class, with its image type and the
    acquisition attributes the converter leaves out. Returns the file."""
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    single = write_ct_series(phantom, folder / "single", series_number=series_number)
    frames = [pydicom.dcmread(p) for p in single]
    kind = "enhanced" if enhanced else "legacy"
    mf = LegacyConvertedEnhancedCTImage(
        frames, series_instance_uid=_uid(f"{kind}-series-{phantom.seed}"), series_number=series_number,
        sop_instance_uid=_uid(f"{kind}-instance-{phantom.seed}"), instance_number=1,
    )
    mf.SeriesDescription = "CHEST WO CONTRAST 2.5mm"
    if enhanced:
        mf.SOPClassUID = ENHANCED_CT
        mf.file_meta.MediaStorageSOPClassUID = ENHANCED_CT
        mf.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    path = folder / f"{kind}.dcm"
    mf.save_as(path, enforce_file_format=True)
    for p in single:
        p.unlink()
    return path
