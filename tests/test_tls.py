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
