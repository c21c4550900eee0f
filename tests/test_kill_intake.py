"""kill -9 at random moments of a 300-slice transfer: every instance the sender saw acknowledged is on disk with its
audit row after the restart, and the series is queued for processing once."""

from __future__ import annotations

import random
import re
import subprocess
import time

import pytest
from pydicom import dcmread

from lpm_node.demo.phantom import make_phantom, write_ct_series
from tests.support_net import NodeProcess, dcmtk_env, have_dcmtk, storescu

pytestmark = pytest.mark.skipif(not have_dcmtk(), reason="dcmtk not installed")

_SENT = re.compile(r"Sending file: (\S+)")
_OK = re.compile(r"Received Store Response \(Success\)")


def _acknowledged(output: str) -> set[str]:
    """Files whose C-STORE storescu saw answered with success (its -v log pairs each file with its response)."""
    acked: set[str] = set()
    current = None
    for line in output.splitlines():
        if m := _SENT.search(line):
            current = m.group(1)
        elif _OK.search(line) and current is not None:
            acked.add(current)
            current = None
    return acked


def test_kill_9_during_a_300_slice_transfer_loses_nothing_acknowledged(tmp_path):
    files = write_ct_series(make_phantom(n_slices=300, size=128, pixel_spacing=2.8), tmp_path / "ct")
    sop_of = {str(f): str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    series_uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    node = NodeProcess(tmp_path / "node", stable_seconds=2)
    rng = random.Random(9)
    acked: set[str] = set()
    for _round in range(4):
        node.start()
        sender = subprocess.Popen(["storescu", "-v", "-aec", "LPM_NODE", "127.0.0.1", str(node.port),
                                   *map(str, files)], env=dcmtk_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        time.sleep(rng.uniform(0.3, 2.0))
        node.kill()
        out, _ = sender.communicate(timeout=60)
        acked |= {sop_of[f] for f in _acknowledged(out)}
        # after the crash: every acknowledged instance is in the spool with its audit row
        spooled = {p.stem for p in (node.data_dir / "spool").rglob("*.dcm")}
        assert acked <= spooled
        rows = {r["sop_instance_uid"] for r in node.query("SELECT sop_instance_uid FROM instances")}
        assert acked <= rows
    assert acked, "no instance was acknowledged before the kills"
    with node:
        assert storescu(node.port, files).returncode == 0
        row = node.wait_series_status(series_uid, ["queued"], timeout=60)
        assert row["instance_count"] == 300
        assert len(list((node.data_dir / "spool").rglob("*.dcm"))) == 300
        jobs = node.query("SELECT status FROM jobs WHERE series_instance_uid = ? AND status != 'cancelled'",
                          (series_uid,))
        assert [j["status"] for j in jobs] == ["queued"]
