"""Interoperability of the front door with real senders: dcmtk storescu (every transfer syntax, small PDUs),
dcmsend, pynetdicom with negotiation items, and Orthanc. Data sets are stored byte-identical after the file meta."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE, build_role
from pynetdicom.pdu_primitives import (
    AsynchronousOperationsWindowNegotiation,
    SOPClassExtendedNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.sop_class import CTImageStorage

from lpm_node.demo.phantom import make_phantom, write_ct_series
from tests.support_net import NodeProcess, dcmtk_env, have_dcmtk, storescu
from tests.support_peer import dataset_bytes

pytestmark = pytest.mark.skipif(not have_dcmtk(), reason="dcmtk not installed")

PROPOSE = {ImplicitVRLittleEndian: "-xi", ExplicitVRLittleEndian: "-xe", DeflatedExplicitVRLittleEndian: "-xd",
           JPEGLosslessSV1: "-xs", JPEGLSLossless: "-xt", JPEG2000Lossless: "-xv", RLELossless: "-xr"}


@pytest.fixture(scope="module")
def per_syntax(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("syntaxes")
    small = make_phantom(n_slices=2, size=64, pixel_spacing=5.6)
    files: dict[str, Path] = {}
    for ts in PROPOSE:
        if ts == DeflatedExplicitVRLittleEndian:
            ds = dcmread(write_ct_series(small, tmp / "plain", series_description="CHEST deflated")[0])
            ds.file_meta.TransferSyntaxUID = ts
            files[str(ts)] = tmp / "deflated.dcm"
            ds.save_as(files[str(ts)], enforce_file_format=True)
        else:
            files[str(ts)] = write_ct_series(small, tmp / str(ts), transfer_syntax=ts,
                                             series_description=f"CHEST {ts}")[0]
    return files


def _stored(node: NodeProcess, path: Path) -> Path:
    sop = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    found = list((node.data_dir / "spool").rglob(f"{sop}.dcm"))
    assert len(found) == 1, sop
    return found[0]


def test_storescu_every_syntax_and_small_pdus_byte_identical(tmp_path, per_syntax):
    with NodeProcess(tmp_path / "node") as node:
        for ts, path in per_syntax.items():
            for extra in ([PROPOSE[ts]], [PROPOSE[ts], "--max-pdu", "4096"]):
                result = storescu(node.port, [path], extra=["-v", *extra])
                assert result.returncode == 0 and "Success" in result.stdout + result.stderr, (ts, result.stderr)
            stored = _stored(node, path)
            assert dataset_bytes(stored) == dataset_bytes(path), ts
            assert str(dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID) == ts


def test_dcmsend(tmp_path, per_syntax):
    if shutil.which("dcmsend") is None:
        pytest.skip("dcmsend not installed")
    path = per_syntax[str(ExplicitVRLittleEndian)]
    with NodeProcess(tmp_path / "node") as node:
        result = subprocess.run(["dcmsend", "-aec", "LPM_NODE", "127.0.0.1", str(node.port), str(path)],
                                capture_output=True, text=True, env=dcmtk_env(), timeout=60)
        assert result.returncode == 0, result.stderr
        assert dataset_bytes(_stored(node, path)) == dataset_bytes(path)


def test_pynetdicom_with_role_selection_user_identity_async_window_and_extended_negotiation(tmp_path, per_syntax):
    path = per_syntax[str(ExplicitVRLittleEndian)]
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 2
    identity.primary_field = b"radiographer"
    identity.secondary_field = b"secret"
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = 4
    window.maximum_number_operations_performed = 4
    extended = SOPClassExtendedNegotiation()
    extended.sop_class_uid = CTImageStorage
    extended.service_class_application_information = b"\x02\x00\x00\x00\x01\x00"
    with NodeProcess(tmp_path / "node") as node:
        assoc = ae.associate("127.0.0.1", node.port, ae_title="LPM_NODE",
                             ext_neg=[build_role(CTImageStorage, scu_role=True, scp_role=False), identity, window,
                                      extended])
        assert assoc.is_established
        status = assoc.send_c_store(dcmread(path))
        assoc.release()
        assert status.Status == 0x0000
        assert dataset_bytes(_stored(node, path)) == dataset_bytes(path)


def test_orthanc_as_sender(tmp_path, per_syntax, orthanc):  # noqa: F811
    files = [per_syntax[str(ExplicitVRLittleEndian)], per_syntax[str(JPEG2000Lossless)]]
    with NodeProcess(tmp_path / "node") as node:
        orthanc.put("/modalities/NODE", json.dumps({"AET": "LPM_NODE", "Host": "127.0.0.1", "Port": node.port}))
        ids = [orthanc.post("/instances", f.read_bytes())["ID"] for f in files]
        answer = orthanc.post("/modalities/NODE/store", {"Resources": ids, "Synchronous": True})
        assert answer["FailedInstancesCount"] == 0, answer
        for f in files:
            assert dataset_bytes(_stored(node, f)) == dataset_bytes(f)
        rows = node.wait_rows("SELECT calling_ae, outcome FROM associations WHERE instances_received > 0",
                              until=lambda r: len(r) == 1 and r[0]["outcome"] == "released")
        assert rows[0]["calling_ae"] == "ORTHANC"
