"""The built-in storage listener, driven by dcmtk's storescu and by pynetdicom."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from lpm_node.demo.local_store import LocalStore, _safe_name
from tests.support_sending import ResultFiles, write_results

STORESCU = shutil.which("storescu")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> ResultFiles:
    return write_results(tmp_path_factory.mktemp("results"))


def storescu(port: int, called_ae: str, files: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [STORESCU, "-R", "-aet", "LPM_TEST", "-aec", called_ae, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, TCP_NODELAY="1"),
    )


@pytest.mark.skipif(STORESCU is None, reason="dcmtk storescu not installed")
@pytest.mark.parametrize("chunked", [False, True])  # True: as when the node runs in the same process (the demo)
def test_receives_and_saves_seg_sr_sc_and_ct(tmp_path: Path, results: ResultFiles, chunked: bool,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", chunked)
    folder = tmp_path / "store"
    files = [path for _, path, _ in results.objects] + results.ct
    with LocalStore(folder) as store:
        assert store.port > 0
        done = storescu(store.port, store.ae_title, files)
        assert done.returncode == 0, done.stderr
        assert store.wait_for(len(files), timeout_s=10)
        received = store.received()
    assert len(received) == len(files)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in received)  # no temporary files left
    for original in files:
        sent = pydicom.dcmread(original)
        saved = pydicom.dcmread(folder / f"{sent.SOPInstanceUID}.dcm")
        assert saved.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
        assert saved == sent  # every element as sent
    assert {pydicom.dcmread(p).Modality for p in received} == {"SEG", "SR", "OT", "CT"}


@pytest.mark.skipif(STORESCU is None, reason="dcmtk storescu not installed")
def test_restricted_store_refuses_other_sop_classes(tmp_path: Path, results: ResultFiles) -> None:
    with LocalStore(tmp_path / "store", sop_classes=[CTImageStorage]) as store:
        seg = results.objects[0][1]
        refused = storescu(store.port, store.ae_title, [seg])
        assert refused.returncode != 0
        assert store.received() == []
        accepted = storescu(store.port, store.ae_title, results.ct[:1])
        assert accepted.returncode == 0, accepted.stderr
        assert store.wait_for(1, timeout_s=10)


def test_answers_out_of_resources_when_it_cannot_write(tmp_path: Path, results: ResultFiles) -> None:
    folder = tmp_path / "store"
    with LocalStore(folder) as store:
        shutil.rmtree(folder)
        folder.write_text("not a folder")  # the store's folder is gone: nothing can be written
        ae = AE("LPM_TEST")
        ae.add_requested_context(CTImageStorage, pydicom.dcmread(results.ct[0]).file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", store.port, ae_title=store.ae_title)
        assert assoc.is_established
        try:
            status = assoc.send_c_store(results.ct[0])
        finally:
            assoc.release()
        assert status.Status == 0xA700
        assert store.received() == []
        assert not store.wait_for(1, timeout_s=0.2)


def test_file_names_only_from_valid_uids() -> None:
    assert _safe_name("1.2.840.10008.5.1.4.1.1.66.4") == "1.2.840.10008.5.1.4.1.1.66.4.dcm"
    for bad in ("../../etc/passwd", "1.2.3/4", "", "1." * 40 + "1", "1..2"):
        name = _safe_name(bad)
        assert name.startswith("unnamed-") and "/" not in name


def test_stop_releases_the_port(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    port = store.start()
    store.stop()
    again = LocalStore(tmp_path / "store", port=port)
    assert again.start() == port
    again.stop()
