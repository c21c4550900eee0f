"""DICOM TLS on the front door, with certificates made for the test by openssl and dcmtk peers using +tls."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread

from lpm_node.demo.phantom import make_phantom, write_ct_series
from tests.support_net import NodeProcess, echoscu, have_dcmtk, storescu

pytestmark = pytest.mark.skipif(not (have_dcmtk() and shutil.which("openssl")), reason="dcmtk or openssl missing")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _signed(folder: Path, name: str, ca: str) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj",
             f"/CN={name}", cwd=folder)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "2", cwd=folder)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("certs")
    for ca in ("ca", "rogue-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
                 "-days", "2", "-subj", f"/CN={ca}", cwd=folder)
    _signed(folder, "node", "ca")
    _signed(folder, "modality", "ca")
    _signed(folder, "intruder", "rogue-ca")
    _signed(folder, "pacs", "ca")
    return folder


def _tls(certs: Path, client: str | None) -> list[str]:
    own = ["+tls", str(certs / f"{client}.key"), str(certs / f"{client}.crt")] if client else ["+tla"]
    return [*own, "+cf", str(certs / "ca.crt")]


def test_tls_with_client_certificates(tmp_path, certs):
    files = write_ct_series(make_phantom(n_slices=3, size=64, pixel_spacing=5.6), tmp_path / "ct")
    config = tmp_path / "tls.toml"
    config.write_text(
        "[node]\n"
        f'tls_certificate = "{certs / "node.crt"}"\n'
        f'tls_private_key = "{certs / "node.key"}"\n'
        f'tls_ca_certificates = "{certs / "ca.crt"}"\n'
        "tls_require_client_certificate = true\n"
    )
    with NodeProcess(tmp_path / "node", config=config, echo_extra=_tls(certs, "modality")) as node:
        assert echoscu(node.port, extra=_tls(certs, "modality")).returncode == 0
        sent = storescu(node.port, files, extra=_tls(certs, "modality"))
        assert sent.returncode == 0, sent.stderr
        spooled = {p.stem for p in (node.data_dir / "spool").rglob("*.dcm")}
        assert spooled == {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}

        assert echoscu(node.port, extra=_tls(certs, None)).returncode != 0  # no client certificate
        assert echoscu(node.port, extra=_tls(certs, "intruder")).returncode != 0  # signed by another CA
        assert echoscu(node.port).returncode != 0  # no TLS at all
        assert echoscu(node.port, extra=_tls(certs, "modality")).returncode == 0  # and still serving

        rows = node.wait_rows("SELECT outcome, reason, tls FROM associations WHERE reason LIKE 'TLS handshake%'",
                              until=lambda r: len(r) >= 3)
        assert len(rows) >= 3 and all(r["outcome"] == "aborted" and r["tls"] for r in rows)
        stored = node.query("SELECT tls FROM associations WHERE instances_received > 0")
        assert [r["tls"] for r in stored] == [1]


def test_results_are_sent_to_a_tls_destination(tmp_path, certs):
    from lpm_node.answer.sender import Sender
    from lpm_node.answer.transport import tls_client_context
    from lpm_node.core.audit import Delivery, session_factory
    from lpm_node.core.config import Settings
    from tests.support_net import dcmtk_env, free_port, wait_for_port

    result = write_ct_series(make_phantom(n_slices=1, size=64, pixel_spacing=5.6), tmp_path / "result")[0]
    settings = Settings()
    settings.output.tls = True
    settings.node.tls_certificate = str(certs / "node.crt")
    settings.node.tls_private_key = str(certs / "node.key")
    settings.node.tls_ca_certificates = str(certs / "ca.crt")
    port = free_port()
    received = tmp_path / "pacs"
    received.mkdir()
    pacs = subprocess.Popen(["storescp", "+tls", str(certs / "pacs.key"), str(certs / "pacs.crt"), "+cf",
                             str(certs / "ca.crt"), "-aet", "PACS", "-od", str(received), str(port)],
                            env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, 30, pacs, echo_extra=_tls(certs, "modality"))
        sessions = session_factory(f"sqlite:///{tmp_path / 'audit.sqlite'}")
        with sessions() as session:
            session.add(Delivery(series_instance_uid="1.2.3", destination=f"PACS@127.0.0.1:{port}", object_kind="SEG",
                                 sop_instance_uid=str(dcmread(result, stop_before_pixels=True).SOPInstanceUID),
                                 path=str(result)))
            session.commit()
        plain = Sender(sessions, settings.output, "LPM_NODE", timeout_s=5)
        assert plain.run_once() == 0  # the PACS speaks TLS only
        with sessions() as session:
            session.query(Delivery).update({"next_attempt_at": Delivery.created_at})
            session.commit()
        sender = Sender(sessions, settings.output, "LPM_NODE", timeout_s=10, tls_context=tls_client_context(settings))
        assert sender.run_once() == 1
        assert len(list(received.iterdir())) == 1
        sessions.kw["bind"].dispose()
    finally:
        pacs.kill()
        pacs.wait(10)
