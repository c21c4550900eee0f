"""``lpm-node demo``: the whole flow on loopback, in one command.

Starts a receiving PACS (a local Orthanc when installed, else the built-in storage listener), starts the node
with the bundled phantom model, writes a phantom chest CT with a known liver attenuation, sends it by C-STORE
(dcmtk ``storescu`` when installed), waits for the SEG, SR and key image to arrive at the PACS, prints the
measurement and where the objects are, and stops everything it started.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select

from lpm_node.core.audit import Delivery, Job, Series
from lpm_node.core.config import Settings
from lpm_node.core.destinations import Destination
from lpm_node.core.states import DeliveryStatus, JobStatus, SeriesStatus
from lpm_node.demo.local_store import LocalStore
from lpm_node.demo.model import bundled_model_folder
from lpm_node.demo.orthanc import Orthanc, free_port, orthanc_available
from lpm_node.demo.phantom import make_phantom, write_ct_series
from lpm_node.node.service import Node

WAIT_S = 900.0


def send_series(files: list[Path], port: int, called_ae: str, calling_ae: str = "DEMO_PACS") -> None:
    """C-STORE ``files`` to 127.0.0.1:port (dcmtk storescu when installed, else pynetdicom)."""
    if shutil.which("storescu"):
        cmd = ["storescu", "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port), *map(str, files)]
        subprocess.run(cmd, check=True, env=dict(os.environ, TCP_NODELAY="1"), capture_output=True)
        return
    from pydicom import dcmread
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        raise RuntimeError(f"the node at 127.0.0.1:{port} refused the association")
    try:
        for path in files:
            status = assoc.send_c_store(dcmread(path))
            if getattr(status, "Status", None) != 0x0000:
                raise RuntimeError(f"C-STORE of {path.name} failed: {status}")
    finally:
        assoc.release()


def _demo_settings(settings: Settings, work: Path, destination: Destination) -> Settings:
    demo = copy.deepcopy(settings)
    demo.node.host = "127.0.0.1"
    demo.node.port = free_port()
    demo.node.data_dir = str(work / "node")
    demo.node.database_url = ""
    demo.node.allowed_ae_titles = []
    demo.node.allowed_hosts = []
    demo.node.measure = True
    demo.series.stable_seconds = 2.0
    demo.output.destinations = [destination]
    demo.output.reply_to_sender = False
    demo.model.folder = demo.model.folder or str(bundled_model_folder())  # the demo asks for the test model
    return demo


def _wait_for_results(node: Node, series_uid: str, say) -> tuple[Series, Job | None, list[Delivery]]:  # noqa: ANN001
    deadline = time.monotonic() + WAIT_S
    last = ""
    while time.monotonic() < deadline:
        with node.sessions() as session:
            series = session.scalars(select(Series).where(Series.series_instance_uid == series_uid)).first()
            job = session.scalars(select(Job).where(Job.series_instance_uid == series_uid).order_by(Job.id)).first()
            deliveries = list(session.scalars(select(Delivery).where(Delivery.series_instance_uid == series_uid)))
        state = series.status if series else SeriesStatus.RECEIVING
        sent = sum(d.status == DeliveryStatus.SENT for d in deliveries)
        if deliveries:
            state = f"sending ({sent}/{len(deliveries)} delivered)"
        if state != last:
            say(f"node: {state}")
            last = state
        finished = (SeriesStatus.REJECTED, SeriesStatus.FAILED, SeriesStatus.NOT_SELECTED)
        if series is not None and series.status in finished:
            return series, job, deliveries
        if deliveries and sent == len(deliveries):
            return series, job, deliveries
        time.sleep(0.3)
    raise TimeoutError(f"no result after {WAIT_S:.0f} s; see `lpm-node audit --data-dir {node.settings.data_path}`")


def _save_key_image_png(path: Path, target: Path) -> Path:
    from PIL import Image

    Image.fromarray(dcmread(path).pixel_array).save(target)
    return target


def demo(settings: Settings, args: argparse.Namespace) -> int:
    """Run the end-to-end demo; 0 when the three result objects arrived at the receiving PACS."""
    work = Path(args.data_dir).resolve() if args.data_dir else Path(tempfile.mkdtemp(prefix="lpm-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f} s] {text}", flush=True)

    pacs: Orthanc | LocalStore
    if orthanc_available():
        pacs = Orthanc(work / "orthanc", aet="DEMO_PACS")
        pacs.start()
        destination = Destination(pacs.aet, "127.0.0.1", pacs.dicom_port)
        say(f"PACS: Orthanc at {destination} (web: {pacs.url}/app/explorer.html)")
    else:
        pacs = LocalStore(work / "received", ae_title="DEMO_PACS")
        destination = Destination("DEMO_PACS", "127.0.0.1", pacs.start())
        say(f"PACS: built-in storage listener at {destination} (Orthanc is not installed)")
    node: Node | None = None
    try:
        node_settings = _demo_settings(settings, work, destination)
        node = Node(node_settings)
        host, port = node.start()
        say(f"node: {node_settings.node.ae_title} listening on {host}:{port}, data in {node_settings.data_path}")
        phantom = make_phantom(args.hu, seed=11)
        files = write_ct_series(phantom, work / "ct")
        say(f"phantom chest CT: {len(files)} slices, true liver attenuation {args.hu:g} HU, in {work / 'ct'}")
        series_uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        send_series(files, port, node_settings.node.ae_title)
        say("sent by C-STORE; waiting for the series to complete, be measured and answered")
        series, job, deliveries = _wait_for_results(node, series_uid, say)
        if job is None or job.status != JobStatus.DONE:
            reason = job.error if job is not None and job.error else series.reason
            say(f"no measurement: {series.status}: {reason}")
            return 1
        value = job.dl_parenchymal_hu
        shown = "n/a" if value is None else f"{value:.1f} HU"
        print()
        print(f"  DL-parenchymal attenuation: {shown}   (phantom truth {args.hu:g} HU)")
        if job.dl_volumetric_hu is not None:
            print(f"  whole-liver attenuation:    {job.dl_volumetric_hu:.1f} HU")
        print(f"  category:                   {job.category}")
        print(f"  QC flags:                   {', '.join(job.qc_flags or []) or 'none'}")
        timings = ", ".join(f"{k} {v:.1f} s" for k, v in (job.timings or {}).items())
        print(f"  stages:                     {timings} on {job.device}")
        print()
        key = next((d for d in deliveries if d.object_kind == "KEY"), None)
        if key is not None:
            png = _save_key_image_png(Path(key.path), work / "key_image.png")
            say(f"key image as PNG: {png}")
        for d in deliveries:
            say(f"delivered {d.object_kind:<3} {d.sop_instance_uid} to {d.destination}")
        if isinstance(pacs, Orthanc):
            say(f"Orthanc storage (stopped with the demo): {pacs.storage}; run it again with "
                f"`Orthanc {pacs.config_path}`")
        else:
            say(f"received objects: {work / 'received'}")
        say(f"audit: lpm-node audit --data-dir {node_settings.data_path} --series {series_uid}")
        return 0
    finally:
        if node is not None:
            node.stop()
        pacs.stop()
        say("stopped the node and the PACS")
