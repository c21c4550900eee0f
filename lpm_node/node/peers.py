"""Is a DICOM peer there? One C-ECHO (used by ``lpm-node doctor`` and the console's health page)."""

from __future__ import annotations

from lpm_node.core.config import Destination


def echo(destination: Destination, calling_ae: str, timeout_s: float = 10.0) -> str | None:
    """C-ECHO ``destination``; None when it answered success, else what went wrong."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(Verification)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        return "association rejected or no answer" if assoc.is_rejected or assoc.is_aborted else "no connection"
    try:
        status = assoc.send_c_echo()
        code = getattr(status, "Status", None)
        return None if code == 0x0000 else f"C-ECHO status {code if code is not None else 'none (timeout)'}"
    finally:
        assoc.release()
