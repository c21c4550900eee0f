"""Guards around pynetdicom's transport for what its state machine leaves open to a hostile peer.

:class:`GuardedSocket` replaces pynetdicom's :class:`~pynetdicom.transport.AssociationSocket` for
accepted connections. pynetdicom's reactor reads each PDU as ``recv(6)`` (type and length) then
``recv(length)``; the guard looks at those bytes before pynetdicom decodes them and closes the
connection (after an A-ABORT) when:

- a PDU declares more than it may hold: a P-DATA-TF above the maximum PDU length the node
  advertised, an A-ASSOCIATE-RQ above :data:`MAX_ASSOCIATE_RQ_BYTES`, a release or abort PDU other
  than 4 bytes (so memory per association stays bounded whatever lengths a peer declares);
- a P-DATA-TF carries a PDV that runs past its PDU, a PDV on a presentation context that was not
  accepted, a command set above :data:`MAX_COMMAND_BYTES`, or a data set with no command before it;
- the association is not established within the associate deadline after the connection, a PDU
  is not complete within the idle deadline after its first byte (a peer dripping bytes), or the
  connection is still open :data:`ABORT_CLOSE_S` after an A-ABORT (whatever the peer sends).

The reason is kept in :attr:`GuardedSocket.problem` for the audit.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import TYPE_CHECKING

from pynetdicom.transport import AssociationSocket

if TYPE_CHECKING:
    from pynetdicom.association import Association

MAX_ASSOCIATE_RQ_BYTES = 256 * 1024  # 128 contexts of 20 transfer syntaxes fit several times
MAX_COMMAND_BYTES = 64 * 1024  # a C-STORE-RQ command set is about 200 bytes
ABORT_CLOSE_S = 2.0  # the connection is closed this long after an A-ABORT, whatever the peer does
_RECV_SLICE_S = 1.0  # recv() waits at most this long at a time, so deadlines are checked while a peer drips
_A_ABORT = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x00])  # A-ABORT, source: service provider
_FIXED_LENGTH_PDUS = {0x03: 4, 0x05: 4, 0x06: 4, 0x07: 4}  # A-ASSOCIATE-RJ, A-RELEASE-RQ/RP, A-ABORT


class GuardedSocket(AssociationSocket):
    """pynetdicom's association socket with bounds on PDU sizes, PDV structure and deadlines."""

    def __init__(self, assoc: Association, client_socket: socket.socket, *, max_pdu: int,
                 associate_timeout_s: float, idle_timeout_s: float) -> None:
        super().__init__(assoc, client_socket=client_socket)
        self.max_pdu = max_pdu
        self.connected_at = time.monotonic()
        self.associate_deadline = self.connected_at + associate_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.problem = ""  # why the guard closed the connection ("" when it did not)
        self._pdu_type = 0
        self._pdu_started = 0.0
        self._body_expected = -1  # length of the PDU body pynetdicom reads next; -1: a header comes next
        self._command = bytearray()  # the command set being received (at most MAX_COMMAND_BYTES)
        self._expect_data = False  # a command with a data set was received; its data set comes next
        self._aborted_at: float | None = None
        client_socket.settimeout(_RECV_SLICE_S)

    # -- deadlines ------------------------------------------------------------------------------
    def _deadline(self) -> float:
        deadline = self._pdu_started + self.idle_timeout_s
        if not self._associated():
            deadline = min(deadline, self.associate_deadline)
        if self._aborted_at is not None:
            deadline = min(deadline, self._aborted_at + ABORT_CLOSE_S)
        return deadline

    def _associated(self) -> bool:
        """Whether the association was accepted (its contexts are recorded just before the A-ASSOCIATE-AC)."""
        return bool(getattr(self.assoc, "_accepted_cx", None)) or self.assoc.is_established

    def _state(self) -> str:
        try:
            return str(self.assoc.dul.state_machine.current_state)
        except AttributeError:
            return ""

    @property
    def ready(self) -> bool:  # type: ignore[override]
        """pynetdicom's poll, plus the deadlines that hold while no byte arrives."""
        now = time.monotonic()
        if self.socket is not None:
            if self._state() == "Sta13" and self._aborted_at is None:
                self._aborted_at = now
            if self._aborted_at is not None and now > self._aborted_at + ABORT_CLOSE_S:
                self._give_up("still open 2 s after an A-ABORT", send_abort=False)
                return False
            if not self._associated() and not self.assoc.is_rejected and now > self.associate_deadline:
                self._give_up("no association within the associate deadline")
                return False
        return bool(AssociationSocket.ready.fget(self))  # type: ignore[attr-defined]

    # -- reading --------------------------------------------------------------------------------
    def recv(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` (a PDU header or body, as pynetdicom asks), checking it before pynetdicom sees it."""
        sock = self.socket
        if sock is None:
            return bytearray()
        header = self._body_expected < 0
        if header:
            self._pdu_started = time.monotonic()
        buffer = bytearray()
        while len(buffer) < nr_bytes:
            if time.monotonic() > self._deadline():
                self._give_up(self._late_reason())
                raise TimeoutError(self.problem)
            try:
                chunk = sock.recv(min(65536, nr_bytes - len(buffer)))
            except TimeoutError:
                continue
            if not chunk:
                self._body_expected = -1
                self._wake_acceptor()
                return buffer
            buffer.extend(chunk)
        if header:
            self._check_header(bytes(buffer))
        else:
            self._check_body(buffer)
        return buffer

    def _late_reason(self) -> str:
        if self._aborted_at is not None:
            return "still sending 2 s after an A-ABORT"
        if not self._associated():
            return "no association within the associate deadline"
        return f"a PDU was not complete within {self.idle_timeout_s:g} s"

    def _check_header(self, data: bytes) -> None:
        if len(data) < 6:
            return
        pdu_type, _reserved, length = struct.unpack(">BBL", data)
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            self._refuse(f"unknown PDU type 0x{pdu_type:02X}")
        if not self._associated() and pdu_type not in (0x01, 0x07):
            self._refuse(f"PDU type 0x{pdu_type:02X} before an association was requested")
        limit = {0x01: MAX_ASSOCIATE_RQ_BYTES, 0x02: MAX_ASSOCIATE_RQ_BYTES, 0x04: self.max_pdu}.get(pdu_type)
        fixed = _FIXED_LENGTH_PDUS.get(pdu_type)
        if limit is not None and length > limit:
            self._refuse(f"PDU type 0x{pdu_type:02X} of {length} bytes, above the {limit} the node accepts")
        if fixed is not None and length != fixed:
            self._refuse(f"PDU type 0x{pdu_type:02X} declares {length} bytes instead of {fixed}")
        self._pdu_type = pdu_type
        self._body_expected = length if pdu_type in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07) else -1

    def _check_body(self, body: bytearray) -> None:
        self._body_expected = -1
        if self._pdu_type == 0x04:
            self._check_pdvs(memoryview(body))

    def _check_pdvs(self, body: memoryview) -> None:
        """Walk the PDV items of a P-DATA-TF body (headers only)."""
        # the contexts are recorded before the A-ASSOCIATE-AC is sent, and is_established only after: a peer's
        # first P-DATA-TF may be read in between
        accepted = set(getattr(self.assoc, "_accepted_cx", {}) or {})
        offset = 0
        while offset < len(body):
            if offset + 6 > len(body):
                self._refuse("P-DATA-TF ends inside a PDV header")
            (length,) = struct.unpack_from(">L", body, offset)
            if length < 2 or offset + 4 + length > len(body):
                self._refuse(f"PDV of {length} bytes does not fit its PDU")
            context_id, control = body[offset + 4], body[offset + 5]
            if context_id not in accepted:
                self._refuse(f"PDV on presentation context {context_id}, which was not accepted")
            if control & 1:  # command fragment
                if self._expect_data:
                    self._refuse("a command set arrived before the previous data set was complete")
                self._command += body[offset + 6 : offset + 4 + length]
                if len(self._command) > MAX_COMMAND_BYTES:
                    self._refuse(f"command set above {MAX_COMMAND_BYTES} bytes")
                if control & 2:
                    elements = _command_elements(bytes(self._command))
                    if elements.get(0x0100) == b"\x01\x00" and not elements.get(0x1000, b"").strip(b"\0 "):
                        self._refuse("C-STORE-RQ without an Affected SOP Instance UID")
                    self._expect_data = elements.get(0x0800) != b"\x01\x01"
                    self._command = bytearray()
            else:
                if not self._expect_data:
                    self._refuse("data set without a command")
                if control & 2:
                    self._expect_data = False
            offset += 4 + length

    def close(self) -> None:
        super().close()
        self._wake_acceptor()

    def _wake_acceptor(self) -> None:
        """pynetdicom's acceptor waits ``acse_timeout`` for an A-ASSOCIATE-RQ even after the connection closed:
        end that wait at once, so that a closed connection frees its slot."""
        if self.assoc.requestor.primitive is None and not self.assoc.is_established:
            self.assoc.dul.to_user_queue.put(None)  # type: ignore[arg-type]

    # -- giving up ------------------------------------------------------------------------------
    def _refuse(self, reason: str) -> None:
        self._give_up(reason)
        raise ConnectionAbortedError(reason)

    def _give_up(self, reason: str, *, send_abort: bool = True) -> None:
        """Record why, send an A-ABORT (best effort) and close the connection."""
        if not self.problem:
            self.problem = reason
        sock = self.socket
        if sock is not None and send_abort:
            try:
                sock.settimeout(0.5)
                sock.sendall(_A_ABORT)
            except OSError:
                pass
        self.close()


def _command_elements(command: bytes) -> dict[int, bytes]:
    """The elements of an encoded command set (implicit VR little endian, group 0000) as {element: value}.

    A command that cannot be walked gives what was read so far; pynetdicom then refuses the command.
    """
    elements: dict[int, bytes] = {}
    offset = 0
    while offset + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHL", command, offset)
        if group != 0x0000 or offset + 8 + length > len(command):
            break
        elements[element] = command[offset + 8 : offset + 8 + length]
        offset += 8 + length
    return elements
