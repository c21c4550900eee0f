"""The listener's DICOM upper layer: encodings checked against pydicom, limits, and a second peer (pynetdicom)."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import select

from lpm_node.core.audit import Association as AssociationRow
from lpm_node.core.audit import session_factory
from lpm_node.core.config import Settings
from lpm_node.demo.phantom import make_phantom, write_ct_series
from lpm_node.intake.listener import CannotUnderstand, Listener, parse_header, parse_header_fragments
from lpm_node.intake.spool import Spool
from lpm_node.intake.upper_layer import Command, encode_response
from tests.support_net import associate_rq, echoscu, have_dcmtk, read_pdu


def _encoded(ds: Dataset, implicit: bool = False) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def _pydicom_command(ds: Dataset) -> bytes:
    """A command set as pydicom writes it, with its group length first."""
    body = _encoded(ds, implicit=True)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


@pytest.mark.parametrize("field, message_id, status, sop_class, sop_instance, comment", [
    (0x8001, 7, 0x0000, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.44", ""),
    (0x8001, 65535, 0xA700, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4",
     "out of resources: spool quota reached: 123 kB used + 512 kB incoming > spool_quota_mb=1"),
    (0x8001, 3, 0xC000, "1.2.840.10008.5.1.4.1.1.2.1", "1.2.3", "cannot understand: missing StudyInstanceUID"),
    (0x8030, 1, 0x0000, "1.2.840.10008.1.1", "", ""),
])
def test_responses_are_what_pydicom_encodes(field, message_id, status, sop_class, sop_instance, comment):
    ds = Dataset()
    ds.AffectedSOPClassUID = sop_class
    ds.CommandField = field
    ds.MessageIDBeingRespondedTo = message_id
    ds.CommandDataSetType = 0x0101
    ds.Status = status
    if comment:
        ds.ErrorComment = comment[:64].strip()
    if sop_instance:
        ds.AffectedSOPInstanceUID = sop_instance
    assert encode_response(field, message_id, status, sop_class, sop_instance, comment) == _pydicom_command(ds)


def test_command_decoding():
    ds = Dataset()
    ds.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.CommandField = 0x0001
    ds.MessageID = 513
    ds.Priority = 0
    ds.CommandDataSetType = 0x0000
    ds.AffectedSOPInstanceUID = "1.2.3.4.5"
    ds.MoveOriginatorApplicationEntityTitle = "MOVER"
    command = Command.decode(_pydicom_command(ds))
    assert command == Command(field=1, message_id=513, data_set_type=0, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                              sop_instance_uid="1.2.3.4.5")
    with pytest.raises(ValueError):
        Command.decode(b"\x00" * 3)


@pytest.fixture(scope="module")
def one_slice(tmp_path_factory) -> Path:
    return write_ct_series(make_phantom(n_slices=1, size=64, pixel_spacing=5.6), tmp_path_factory.mktemp("one"),
                           series_description="CHEST Thorax")[0]


@pytest.mark.filterwarnings("ignore:Unknown encoding")  # a first fragment cut inside SpecificCharacterSet
def test_header_from_fragments_matches_the_whole(one_slice):
    ds = dcmread(one_slice)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SeriesDescription = "Thorax nativ Übersicht"
    whole = _encoded(ds)
    expected = parse_header(whole, ExplicitVRLittleEndian)
    assert expected.series_description == "Thorax nativ Übersicht"
    assert expected.series_instance_uid == ds.SeriesInstanceUID and expected.modality == "CT"
    view = memoryview(bytearray(whole))
    cut_in_uid = whole.index(ds.SeriesInstanceUID.encode()) + 5  # the first fragment ends inside a UID
    for cut in (16, 200, cut_in_uid, 4000, len(whole) - 10):
        assert parse_header_fragments([view[:cut], view[cut:]], ExplicitVRLittleEndian) == expected, cut
    implicit = _encoded(ds, implicit=True)
    assert parse_header(implicit, ImplicitVRLittleEndian) == expected


def test_header_refusals(one_slice):
    ds = dcmread(one_slice)
    del ds.SeriesInstanceUID
    with pytest.raises(CannotUnderstand, match="missing SeriesInstanceUID"):
        parse_header(_encoded(ds), ExplicitVRLittleEndian)
    with pytest.raises(CannotUnderstand):
        parse_header(b"\x08\x00\x18\x00UI\xff\xff" + b"1.2", ExplicitVRLittleEndian)


@pytest.fixture()
def listener(tmp_path):
    settings = Settings()
    settings.node.data_dir = str(tmp_path / "node")
    settings.node.port = 0
    settings.node.max_associations = 1
    sessions = session_factory(settings.db_url)
    spool = Spool(settings.spool_path, journal_dir=settings.journal_path, journal_mb=16)
    node = Listener(settings, sessions, spool)
    node.start()
    yield node
    node.stop()
    spool.close()


def test_pynetdicom_peer_stores_and_echoes(listener, one_slice, tmp_path):
    port = listener._server.address[1]
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, [ImplicitVRLittleEndian])
    ae.maximum_pdu_size = 16384  # the data set arrives in many small fragments
    assoc = ae.associate("127.0.0.1", port, ae_title="LPM_NODE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    status = assoc.send_c_store(dcmread(one_slice))
    assert status.Status == 0
    assoc.release()
    listener.spool.flush()
    stored = list(Path(listener.settings.spool_path).rglob("*.dcm"))
    assert len(stored) == 1
    got, sent = dcmread(stored[0]), dcmread(one_slice)
    assert got.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert got.PixelData == sent.PixelData and got.SOPInstanceUID == sent.SOPInstanceUID
    assert got.file_meta.SourceApplicationEntityTitle == "PYNETDICOM"


@pytest.mark.skipif(not have_dcmtk(), reason="dcmtk not installed")
def test_association_limit_is_answered_with_a_transient_rejection(listener):
    port = listener._server.address[1]
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", port, ae_title="LPM_NODE")
    assert held.is_established
    busy = echoscu(port)
    assert busy.returncode != 0 and "Association Rejected" in busy.stdout + busy.stderr
    held.release()
    deadline = time.monotonic() + 5
    while echoscu(port).returncode != 0:  # the slot is free again once the first association ended
        assert time.monotonic() < deadline
        time.sleep(0.05)
    listener.recorder.flush()
    with listener.sessions() as session:
        rejected = select(AssociationRow).where(AssociationRow.outcome == "rejected")
        reasons = [r.reason for r in session.scalars(rejected)]
    assert reasons == ["1 associations already open"]


def test_garbage_in_data_phase_is_aborted(listener):
    """A P-DATA-TF with an unaccepted context ID, after a good association: A-ABORT, then the port still works."""
    port = listener._server.address[1]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(associate_rq("RAW"))
        assert read_pdu(sock)[:1] == b"\x02"  # A-ASSOCIATE-AC
        sock.sendall(struct.pack(">BBIIBB", 0x04, 0, 8, 4, 9, 0x03) + b"xx")  # context 9 was never proposed
        reply = b""
        while len(reply) < 10:
            chunk = sock.recv(64)
            if not chunk:
                break
            reply += chunk
        assert reply[:1] == b"\x07"  # A-ABORT
    deadline = time.monotonic() + 5
    rows: list[AssociationRow] = []
    while not any("presentation context 9" in (r.reason or "") for r in rows) and time.monotonic() < deadline:
        time.sleep(0.05)  # the connection thread records the end once the peer has closed
        listener.recorder.flush()
        with listener.sessions() as session:
            rows = list(session.scalars(select(AssociationRow)))
    assert any(r.outcome == "aborted" and "presentation context 9" in (r.reason or "") for r in rows)


def test_orthanc_as_the_sending_pacs(listener, tmp_path):
    """The deployment case: a PACS (Orthanc) C-STOREs a series to the node."""
    import json

    from lpm_node.demo.orthanc import Orthanc, orthanc_available

    if not orthanc_available():
        pytest.skip("Orthanc not installed")
    files = write_ct_series(make_phantom(n_slices=6, size=128, pixel_spacing=2.8), tmp_path / "series")
    port = listener._server.address[1]
    with Orthanc(tmp_path / "orthanc") as pacs:
        ids = [pacs.post("/instances", f.read_bytes())["ID"] for f in files]
        pacs.put("/modalities/lpm", json.dumps({"AET": "LPM_NODE", "Host": "127.0.0.1", "Port": port}))
        pacs.post("/modalities/lpm/store", {"Resources": ids, "Synchronous": True})
    assert listener.spool.flush(timeout=30)
    stored = sorted(Path(listener.settings.spool_path).rglob("*.dcm"))
    assert len(stored) == len(files)
    sent = {dcmread(f).SOPInstanceUID: dcmread(f) for f in files}
    for path in stored:
        got = dcmread(path)
        assert np.array_equal(got.pixel_array, sent[got.SOPInstanceUID].pixel_array)
        assert got.file_meta.SourceApplicationEntityTitle == "ORTHANC"


def test_a_multiframe_larger_than_a_journal_segment_in_small_pdus(listener, tmp_path):
    """Legacy Converted Enhanced CT of 40 frames (5 MB, more than a 4 MB journal segment) in 16 kB PDUs."""
    from highdicom.legacy import LegacyConvertedEnhancedCTImage
    from pydicom.uid import generate_uid
    from pynetdicom.sop_class import LegacyConvertedEnhancedCTImageStorage

    frames = [dcmread(p) for p in write_ct_series(make_phantom(n_slices=40, size=256, pixel_spacing=1.4),
                                                  tmp_path / "frames")]
    mf = LegacyConvertedEnhancedCTImage(frames, series_instance_uid=generate_uid(), series_number=9,
                                        sop_instance_uid=generate_uid(), instance_number=1)
    port = listener._server.address[1]
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(LegacyConvertedEnhancedCTImageStorage, [ExplicitVRLittleEndian])
    ae.maximum_pdu_size = 16384
    assoc = ae.associate("127.0.0.1", port, ae_title="LPM_NODE")
    assert assoc.is_established
    for _ in range(2):  # the second time over the same association: a duplicate, accepted
        assert assoc.send_c_store(mf).Status == 0
    assoc.release()
    assert listener.spool.flush(timeout=30)
    stored = list(Path(listener.settings.spool_path).rglob("*.dcm"))
    assert len(stored) == 1 and stored[0].stat().st_size > listener.spool.journal.segment_bytes
    got = dcmread(stored[0])
    assert int(got.NumberOfFrames) == 40 and got.PixelData == mf.PixelData
