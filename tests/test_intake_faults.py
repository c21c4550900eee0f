"""The front door under faults, with a real ``lpm-node serve``: the disk filling up while a data set arrives
(a small tmpfs) is answered 0xA700 and audited; a malformed header value (a Specific Character Set given as a
sequence or as binary) is answered 0xC000 (cannot understand, not out of resources) and audited with its reason; an
unexpected error in the C-STORE handler (one fault injected) is answered 0x0110, audited and logged as an ERROR.
Nothing acknowledged is lost."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.support_fault_node import FAULT_ENV
from tests.support_net import NodeProcess, have_dcmtk, read_pdu, storescu
from tests.support_peer import A_RELEASE_RQ, associate, c_store_command, c_store_pdus, dataset_bytes, store_status
from tests.support_phantom import small_phantom, write_series

pytestmark = pytest.mark.skipif(not have_dcmtk(), reason="dcmtk not installed")


def _store(port: int, path: Path) -> str:
    """Send one file with dcmtk's storescu; returns what it printed (its verbose log names the status)."""
    result = storescu(port, [path], calling="FAULTS", extra=["-v", "-nh"])
    return result.stdout + result.stderr


def _association(node: NodeProcess) -> dict:
    rows = node.wait_rows("SELECT * FROM associations WHERE calling_ae = 'FAULTS' ORDER BY id DESC",
                          until=lambda rows: rows and rows[0]["outcome"] != "open")
    return dict(rows[0])


@pytest.fixture
def small_disk(tmp_path: Path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_disk_filling_during_a_transfer_is_answered_out_of_resources_and_audited(tmp_path, small_disk):
    source = write_series(small_phantom(n_slices=1), tmp_path / "ct")[0]
    big = tmp_path / "big.dcm"  # 8 MB of pixel data: more than the room left below
    ds = dcmread(source)
    ds.Rows = ds.Columns = 2048
    ds.PixelData = bytes(2048 * 2048 * 2)
    ds.save_as(big)

    config = tmp_path / "node.toml"
    config.write_text("[node]\nmin_free_disk_mb = 0\n")  # the node's own free-space floor would refuse it first
    node = NodeProcess(small_disk / "data", config=config, database_url=f"sqlite:///{tmp_path / 'audit.sqlite'}")
    with node:
        free = shutil.disk_usage(small_disk).free
        with open(small_disk / "filler", "wb") as fh:  # leave 2 MB: the transfer starts, then the disk is full
            fh.write(bytes(free - 2 * 2**20))
        assert "Received Store Response (Refused: OutOfResources)" in _store(node.port, big)
        row = _association(node)
        assert row["outcome"] == "released" and row["instances_refused"] == 1
        assert "0xA700" in row["reason"] and "No space left on device" in row["reason"], row["reason"]
        assert "ERROR" in node.log() and "could not be written while it arrived" in node.log()
        assert not list((small_disk / "data" / "spool").rglob("*.dcm"))
        incoming = small_disk / "data" / "spool" / ".incoming"
        assert not [p for p in incoming.rglob("*") if p.is_file()]  # the partial data set is gone

        (small_disk / "filler").unlink()  # room again: the same instance is accepted and kept
        assert "Received Store Response (Success)" in _store(node.port, big)
        stored = list((small_disk / "data" / "spool").rglob("*.dcm"))
        assert len(stored) == 1 and stored[0].stat().st_size > 8 * 2**20
        assert node.wait_rows("SELECT id FROM instances WHERE sop_instance_uid = ?", (str(ds.SOPInstanceUID),))


def _hostile_store(port: int, sop_class: str, sop_instance: str, dataset: bytes) -> int | None:
    """One C-STORE from a raw-socket peer (pydicom-based senders cannot even read such a data set); released."""
    with associate(port, calling_ae="FAULTS") as sock:
        sock.sendall(c_store_pdus(c_store_command(sop_class, sop_instance), dataset))
        status = store_status(sock)
        sock.sendall(A_RELEASE_RQ)
        read_pdu(sock)  # A-RELEASE-RP
        return status


def _charset_replaced(dataset: bytes, element: bytes) -> bytes:
    """``dataset`` (explicit VR little endian) with its Specific Character Set, the first element, replaced."""
    assert dataset[:4] == b"\x08\x00\x05\x00"  # Specific Character Set, the data set's first element
    length = struct.unpack_from("<H", dataset, 6)[0]
    return element + dataset[8 + length:]


def _item(*elements: bytes) -> bytes:
    body = b"".join(elements)
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body


CODE_ITEM = _item(struct.pack("<HH2sH", 0x0008, 0x0100, b"SH", 2) + b"X ")
SEQUENCE_CHARSETS = {  # Specific Character Set as a sequence of one item (pydicom fails to read on)
    "undefined length": struct.pack("<HH2sHI", 0x0008, 0x0005, b"SQ", 0, 0xFFFFFFFF) + CODE_ITEM
    + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0),
    "defined length": struct.pack("<HH2sHI", 0x0008, 0x0005, b"SQ", 0, len(CODE_ITEM)) + CODE_ITEM,
}
BINARY_CHARSET = struct.pack("<HH2sH", 0x0008, 0x0005, b"US", 3) + b"\x01\x02\x03"  # pydicom: BytesLengthException


@pytest.mark.parametrize("encoding", list(SEQUENCE_CHARSETS))
def test_specific_character_set_as_a_sequence_is_answered_cannot_understand_and_audited(tmp_path, encoding):
    """storescu sends a data set whose Specific Character Set is a sequence: 0xC000 with the reason in the audit;
    the same instance, well formed, is then accepted."""
    source = write_series(small_phantom(n_slices=1), tmp_path / "ct")[0]
    ds = dcmread(source, stop_before_pixels=True)
    dataset = dataset_bytes(source)
    malformed = tmp_path / "sequence-charset.dcm"
    element = SEQUENCE_CHARSETS[encoding]
    malformed.write_bytes(source.read_bytes()[:-len(dataset)] + _charset_replaced(dataset, element))
    with NodeProcess(tmp_path / "node") as node:
        assert "Received Store Response (Error: CannotUnderstand)" in _store(node.port, malformed)
        row = _association(node)
        assert row["outcome"] == "released" and row["instances_refused"] == 1
        assert "0xC000: cannot understand: data set does not parse" in row["reason"], row["reason"]
        assert str(ds.SOPInstanceUID) in row["reason"]
        assert "0xA700" not in node.log() and "Traceback" not in node.log()
        assert not list((tmp_path / "node" / "spool").rglob("*.dcm"))
        assert "Received Store Response (Success)" in _store(node.port, source)
        assert node.wait_rows("SELECT id FROM instances WHERE sop_instance_uid = ?", (str(ds.SOPInstanceUID),))


def test_binary_specific_character_set_is_answered_cannot_understand_and_audited(tmp_path):
    """A raw-socket peer (pydicom-based senders cannot even read such a data set) sends a Specific Character Set of
    3 bytes of US: pydicom raises while the header reader decodes it; answered 0xC000, audited, not an ERROR."""
    source = write_series(small_phantom(n_slices=1), tmp_path / "ct")[0]
    ds = dcmread(source, stop_before_pixels=True)
    dataset = dataset_bytes(source)
    hostile = _charset_replaced(dataset, BINARY_CHARSET)
    with NodeProcess(tmp_path / "node") as node:
        assert _hostile_store(node.port, str(ds.SOPClassUID), str(ds.SOPInstanceUID), hostile) == 0xC000
        row = _association(node)
        assert row["outcome"] == "released" and row["instances_refused"] == 1
        assert "0xC000" in row["reason"] and "Specific Character Set does not decode" in row["reason"], row
        assert "ERROR" not in node.log() and "Traceback" not in node.log()
        assert not list((tmp_path / "node" / "spool").rglob("*.dcm"))
        assert _hostile_store(node.port, str(ds.SOPClassUID), str(ds.SOPInstanceUID), dataset) == 0x0000


def test_unexpected_error_in_the_handler_is_answered_0110_audited_and_logged(tmp_path):
    """No real input is known to reach the catch-all any more, so the node runs with one fault injected: its header
    reader raises RuntimeError for one instance. That C-STORE is answered 0x0110 (not pynetdicom's unaudited
    0xC211), audited with the error, logged as an ERROR with its traceback; the node goes on serving."""
    first, second = write_series(small_phantom(n_slices=2), tmp_path / "ct")
    faulty = str(dcmread(first, stop_before_pixels=True).SOPInstanceUID)
    node = NodeProcess(tmp_path / "node", module="tests.support_fault_node",
                       env={FAULT_ENV: faulty})
    with node:
        assert "Received Store Response (Unknown Status: 0x110)" in _store(node.port, first)
        row = _association(node)
        assert row["outcome"] == "released" and row["instances_refused"] == 1
        assert "0x0110" in row["reason"] and "RuntimeError: injected fault in the header reader" in row["reason"]
        log = node.log()
        assert "ERROR" in log and "unexpected error in the handler" in log and "Traceback" in log
        assert "Received Store Response (Success)" in _store(node.port, second)
        assert node.wait_rows("SELECT id FROM instances")
        assert not list((tmp_path / "node" / "spool").rglob(f"*{faulty}*"))
