"""The one header reader of intake: the elements the listener, series assembly and the rules use, read
from a DICOM file without its pixel data, with a bound on what a deflated data set may inflate to.

The listener reads received instances with it before they are acknowledged, series assembly reads
spooled files with it after a crash, and the eligibility rules read their facts with it.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian

# The elements intake reads from a data set: identity (listener), and the facts the eligibility rules use.
HEADER_KEYWORDS: tuple[str, ...] = (
    "SpecificCharacterSet", "ImageType", "SOPClassUID", "SOPInstanceUID", "StudyDescription", "Modality",
    "SeriesDescription", "ConvolutionKernel", "BodyPartExamined", "ContrastBolusAgent", "ContrastBolusRoute",
    "ContrastBolusVolume", "ContrastBolusIngredient", "ContrastBolusStartTime", "SliceThickness",
    "SpacingBetweenSlices", "ProtocolName", "StudyInstanceUID", "SeriesInstanceUID", "InstanceNumber",
    "ImagePositionPatient", "ImageOrientationPatient", "NumberOfFrames", "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
)
HEADER_TAGS: list[BaseTag] = sorted(Tag(k) for k in HEADER_KEYWORDS)
_PIXEL_DATA = Tag(0x7FE0, 0x0010)
UNDEFINED_LENGTH = 0xFFFFFFFF
MAX_META_BYTES = 64 * 1024  # a File Meta Information group is a few hundred bytes
MAX_INFLATED_HEADER_BYTES = 8 * 1024 * 1024  # what a deflated data set may inflate to while its header is read

_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")


def is_valid_uid(value: object) -> bool:
    """True when ``value`` is exactly a DICOM UID (PS3.5 9.1): digits and dots, <= 64 characters, nothing else."""
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID_RE.fullmatch(value) is not None


class CannotUnderstand(ValueError):
    """A data set that does not parse or lacks valid UIDs (answered 0xC000)."""


@dataclass(frozen=True)
class Header:
    """The identity of one instance: validated UIDs, modality, series description."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    series_description: str
    transfer_syntax_uid: str = ""

    @classmethod
    def from_dataset(cls, ds: Dataset, transfer_syntax_uid: str = "") -> Header:
        """The header of ``ds``; raises :class:`CannotUnderstand` when a UID is missing or not exactly valid."""
        values = {}
        for key in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            value = _uid_value(ds, key)
            if not value:
                raise CannotUnderstand(f"missing {key}")
            if not is_valid_uid(value):
                raise CannotUnderstand(f"invalid {key}")
            values[key] = value
        try:
            modality = str(ds.get("Modality", "") or "").strip()[:16]
            description = str(ds.get("SeriesDescription", "") or "").strip()[:256]
        except Exception as exc:
            raise CannotUnderstand("Modality or SeriesDescription does not decode") from exc
        return cls(values["SOPClassUID"], values["SOPInstanceUID"], values["StudyInstanceUID"],
                   values["SeriesInstanceUID"], modality, description, transfer_syntax_uid)


def _uid_value(ds: Dataset, keyword: str) -> str:
    """A UI value exactly as encoded, less one padding byte (NUL, or the space some writers use) at an even
    length: a line feed or other trailing characters stay, so that the value fails validation."""
    elem = ds.get_item(keyword)
    if elem is None:
        return ""
    raw = elem.value
    if isinstance(raw, bytes):
        if len(raw) % 2 == 0 and raw[-1:] in (b"\0", b" "):
            raw = raw[:-1]
        return raw.decode("latin-1")
    return "" if raw is None else str(raw)


def _read_exact(fp: BinaryIO, size: int) -> bytes:
    data = fp.read(size)
    if len(data) != size:
        raise CannotUnderstand("file ends inside its file meta information")
    return data


def read_file_meta(fp: BinaryIO) -> tuple[str, int]:
    """(Transfer Syntax UID, offset of the data set) of a DICOM file with preamble and File Meta Information."""
    preamble = _read_exact(fp, 132)
    if preamble[128:] != b"DICM":
        raise CannotUnderstand("no DICM prefix")
    group_length = _read_exact(fp, 12)
    tag_group, tag_elem, vr, _size = struct.unpack("<HH2sH", group_length[:8])
    if (tag_group, tag_elem, vr) != (0x0002, 0x0000, b"UL"):
        raise CannotUnderstand("file meta information has no group length")
    (length,) = struct.unpack("<I", group_length[8:])
    if length > MAX_META_BYTES:
        raise CannotUnderstand(f"file meta information of {length} bytes")
    meta = _read_exact(fp, length)
    ts = ""
    for elem in data_element_generator(BytesIO(meta), False, True):
        if elem.tag == 0x00020010 and isinstance(elem.value, bytes):
            ts = elem.value.decode("ascii", "replace").strip("\0 ")
    if not is_valid_uid(ts):
        raise CannotUnderstand("no valid transfer syntax in the file meta information")
    return ts, 144 + length


def _inflate_bounded(fp: BinaryIO) -> BytesIO:
    """The start of a deflated data set, inflated up to :data:`MAX_INFLATED_HEADER_BYTES`."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    try:
        while len(out) < MAX_INFLATED_HEADER_BYTES:
            chunk = fp.read(65536)
            if not chunk:
                break
            out += inflater.decompress(chunk, MAX_INFLATED_HEADER_BYTES - len(out))
            if inflater.eof:
                break
    except zlib.error as exc:
        raise CannotUnderstand(f"deflated data set does not inflate: {exc}") from exc
    return BytesIO(bytes(out))


def read_header_dataset(path: str | Path) -> tuple[Dataset, str]:
    """The :data:`HEADER_TAGS` elements of a DICOM file (no pixel data) and its transfer syntax.

    Values stay encoded until used (pydicom converts them on access). A deflated data set is inflated
    only as far as :data:`MAX_INFLATED_HEADER_BYTES`. Raises :class:`CannotUnderstand` on a file that
    does not parse.
    """
    with open(path, "rb") as fp:
        ts, _offset = read_file_meta(fp)
        stream: BinaryIO = _inflate_bounded(fp) if ts == DeflatedExplicitVRLittleEndian else fp
        implicit = ts == ImplicitVRLittleEndian
        ds = Dataset()
        try:
            for elem in data_element_generator(stream, implicit, True, stop_when=_past_header,
                                               specific_tags=HEADER_TAGS):
                ds[elem.tag] = elem  # type: ignore[assignment]
        except Exception as exc:  # any failure to walk peer data
            if not any(Tag(k) in ds for k in ("SOPInstanceUID",)):
                raise CannotUnderstand(f"data set does not parse: {type(exc).__name__}") from exc
    try:
        ds.set_original_encoding(implicit, True, _character_set(ds))
    except CannotUnderstand:
        raise
    except Exception as exc:  # pydicom raises OSError, ValueError, ... on a malformed value: not a disk problem
        raise CannotUnderstand(f"Specific Character Set does not decode: {type(exc).__name__}") from exc
    return ds, ts


def _character_set(ds: Dataset) -> str | list[str] | None:
    """The data set's Specific Character Set: one term or several; raises :class:`CannotUnderstand` when it is
    anything else (a sequence, binary values)."""
    raw = ds.get_item("SpecificCharacterSet")
    if raw is None:
        return None
    undefined_length = raw.length == UNDEFINED_LENGTH if isinstance(raw, RawDataElement) else raw.is_undefined_length
    if undefined_length or raw.VR == "SQ":  # an undefined length is a sequence, whatever the VR
        raise CannotUnderstand("Specific Character Set is a sequence, not text")
    value = ds["SpecificCharacterSet"].value
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, MultiValue) and all(isinstance(term, str) for term in value):
        return list(value)
    raise CannotUnderstand(f"Specific Character Set is not text ({ds['SpecificCharacterSet'].VR})")


def _past_header(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    return int(tag) >= _PIXEL_DATA


def read_header(path: str | Path) -> Header:
    """The validated identity of the instance in ``path``; raises :class:`CannotUnderstand`."""
    ds, ts = read_header_dataset(path)
    return Header.from_dataset(ds, ts)
