"""The one header reader of intake: the same values as pydicom's full read, bounded inflation, strict UIDs."""

from __future__ import annotations

import zlib

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from lpm_node.demo.phantom import make_phantom, write_ct_series
from lpm_node.intake.header import (
    HEADER_KEYWORDS,
    MAX_INFLATED_HEADER_BYTES,
    CannotUnderstand,
    read_file_meta,
    read_header,
    read_header_dataset,
)
from lpm_node.intake.headers import read_series_facts


def _same_values(path) -> None:
    full = pydicom.dcmread(path, stop_before_pixels=True)
    ours, _ts = read_header_dataset(path)
    for keyword in HEADER_KEYWORDS:
        if keyword in full:
            assert keyword in ours, keyword
            assert ours[keyword].value == full[keyword].value, keyword


def test_values_match_pydicom_for_enhanced_and_single_frame_ct(tmp_path):
    _same_values(get_testdata_file("eCT_Supplemental.dcm"))  # per-frame functional groups
    files = write_ct_series(make_phantom(n_slices=3, size=32, pixel_spacing=11.2), tmp_path / "ct")
    _same_values(files[0])
    facts = read_series_facts([get_testdata_file("eCT_Supplemental.dcm")])
    assert facts.slices == 2 and facts.axial


def test_deflate_bomb_is_inflated_only_as_far_as_the_bound(tmp_path):
    files = write_ct_series(make_phantom(n_slices=1, size=32, pixel_spacing=11.2), tmp_path / "ct")
    ds = pydicom.dcmread(files[0])
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    good = tmp_path / "deflated.dcm"
    ds.save_as(good, enforce_file_format=True)
    assert read_header(good).sop_instance_uid == str(ds.SOPInstanceUID)
    # a data set that inflates to 1 GB of one private element before anything useful
    raw = good.read_bytes()
    with open(good, "rb") as fp:
        _ts, meta_end = read_file_meta(fp)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = compressor.compress(b"\x09\x00\x10\x00OB\x00\x00" + (2**30).to_bytes(4, "little"))
    for _ in range(2**30 // 2**20):
        body += compressor.compress(b"\0" * 2**20)
    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(raw[:meta_end] + body + compressor.flush())
    assert bomb.stat().st_size < 2 * 2**20
    with pytest.raises(CannotUnderstand):
        read_header(bomb)
    assert MAX_INFLATED_HEADER_BYTES <= 8 * 2**20


def _with_charset_element(tmp_path, transfer_syntax: str, element: bytes):
    """A one-slice CT in ``transfer_syntax`` whose Specific Character Set is replaced by raw ``element``."""
    import struct

    [path] = write_ct_series(make_phantom(30.0, n_slices=1, size=16, seed=5), tmp_path / transfer_syntax[-3:])
    ds = pydicom.dcmread(path)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    with open(path, "rb") as fp:
        _ts, offset = read_file_meta(fp)
    first = offset + 8  # tag, then VR and 2 length bytes (explicit) or 4 length bytes (implicit)
    assert data[offset:offset + 4] == b"\x08\x00\x05\x00", data[offset:offset + 8]
    length = struct.unpack_from("<I" if transfer_syntax == ImplicitVRLittleEndian else "<H", data,
                                offset + (4 if transfer_syntax == ImplicitVRLittleEndian else 6))[0]
    path.write_bytes(data[:offset] + element + data[first + length:])
    return path


@pytest.mark.parametrize("transfer_syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
def test_specific_character_set_as_a_sequence_cannot_be_understood(tmp_path, transfer_syntax):
    """An undefined length on (0008,0005) makes it a sequence: refused as such (it was read as text before, and the
    data set's other values as garbage), never an OSError (which the listener answers 0xA700)."""
    import struct

    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + (
        struct.pack("<HHI", 0x0008, 0x0100, 2) if transfer_syntax == ImplicitVRLittleEndian
        else struct.pack("<HH2sH", 0x0008, 0x0100, b"SH", 2)) + b"X " + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    head = (struct.pack("<HHI", 0x0008, 0x0005, 0xFFFFFFFF) if transfer_syntax == ImplicitVRLittleEndian
            else struct.pack("<HH2sHI", 0x0008, 0x0005, b"UN", 0, 0xFFFFFFFF))
    path = _with_charset_element(tmp_path, transfer_syntax, head + item + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    with pytest.raises(CannotUnderstand, match="Specific Character Set is a sequence"):
        read_header(path)


def test_binary_specific_character_set_cannot_be_understood(tmp_path):
    import struct

    path = _with_charset_element(tmp_path, ExplicitVRLittleEndian,
                                 struct.pack("<HH2sH", 0x0008, 0x0005, b"US", 3) + b"\x01\x02\x03")
    with pytest.raises(CannotUnderstand, match="Specific Character Set does not decode: BytesLengthException"):
        read_header(path)
