"""A small built-in DICOM storage listener (C-STORE SCP) that saves what it receives into a folder.

Used by ``lpm-node demo`` on machines without Orthanc: it accepts the node's outputs (Segmentation,
Comprehensive 3D SR, Secondary Capture) and CT, writes each object atomically (temporary file, fsync,
rename) before answering success, and answers 0xA700 (out of resources) when it cannot store.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    CTImageStorage,
    EnhancedCTImageStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from lpm_node.core.files import atomic_write
from lpm_node.intake.header import is_valid_uid

LOG = logging.getLogger(__name__)

DEFAULT_SOP_CLASSES: tuple[str, ...] = (
    str(SegmentationStorage),
    str(Comprehensive3DSRStorage),
    str(SecondaryCaptureImageStorage),
    str(CTImageStorage),
    str(EnhancedCTImageStorage),
)


def _safe_name(uid: str) -> str:
    """A file name from a peer-sent UID only when it is a well-formed UID; a random one otherwise."""
    uid = (uid or "").strip().rstrip("\0")
    if is_valid_uid(uid):
        return f"{uid}.dcm"
    return f"unnamed-{uuid.uuid4().hex}.dcm"


class LocalStore:
    """A loopback C-STORE SCP writing received objects to ``folder`` as ``<SOPInstanceUID>.dcm``."""

    def __init__(
        self,
        folder: str | Path,
        ae_title: str = "LPM_STORE",
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        sop_classes: Sequence[str] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self.sop_classes = tuple(str(s) for s in (sop_classes if sop_classes is not None else DEFAULT_SOP_CLASSES))
        self._server: ThreadedAssociationServer | None = None
        self._ae: AE | None = None
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._received: dict[str, Path] = {}

    def start(self) -> int:
        """Start listening (in background threads); returns the bound port."""
        if self._server is not None:
            return self.port
        self.folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(Verification)
        for sop_class in self.sop_classes:
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        ae.maximum_associations = 8
        self._ae = ae
        self._server = ae.start_server(
            (self.host, self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        self.port = int(self._server.server_address[1])
        LOG.info("local store %s listening on %s:%d, saving to %s", self.ae_title, self.host, self.port, self.folder)
        return self.port

    def stop(self) -> None:
        """Stop listening and close open associations."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
        if self._ae is not None:
            self._ae.shutdown()
            self._ae = None

    def received(self) -> list[Path]:
        """Files stored since ``start()``, in order of first arrival (one per SOPInstanceUID)."""
        with self._lock:
            return list(self._received.values())

    def wait_for(self, count: int, timeout_s: float) -> bool:
        """Wait until at least ``count`` objects were stored; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._arrived:
            while len(self._received) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._arrived.wait(left)
        return True

    def __enter__(self) -> LocalStore:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _on_store(self, event: Event) -> int:
        """EVT_C_STORE: write the object as received (no re-encoding), then answer."""
        uid = str(event.request.AffectedSOPInstanceUID or "")
        try:
            if _config.STORE_RECV_CHUNKED_DATASET:  # the node in the same process receives to disk
                data = Path(event.dataset_path).read_bytes()
            else:
                data = event.encoded_dataset(include_meta=True)
            path = atomic_write(self.folder / _safe_name(uid), data)
        except OSError as exc:
            LOG.error("local store: cannot save %s: %s", uid, exc)
            return 0xA700
        except Exception as exc:  # noqa: BLE001 - any decoding problem is the peer's dataset
            LOG.error("local store: cannot read %s: %s", uid, exc)
            return 0xC210
        with self._arrived:
            self._received.setdefault(uid or path.name, path)
            self._arrived.notify_all()
        return 0x0000
