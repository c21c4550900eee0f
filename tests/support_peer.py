"""A raw-socket DICOM peer for hostile-input tests: PDUs built byte by byte, so that they can be wrong."""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

from lpm_node.intake.header import read_file_meta
from tests.support_net import associate_rq, read_pdu

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT = "1.2.840.10008.1.2.1"
A_RELEASE_RQ = bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0])
A_ABORT = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0])


def associate_rq_pdu(calling_ae: str = "HOSTILE", contexts: list[tuple[int, str]] | None = None) -> bytes:
    """A-ASSOCIATE-RQ proposing ``(context ID, abstract syntax)`` pairs, each with Explicit VR Little Endian."""
    return associate_rq(calling_ae, contexts=[(1, CT), (3, VERIFICATION)] if contexts is None else contexts,
                        transfer_syntaxes=[EXPLICIT])


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def associate(port: int, calling_ae: str = "HOSTILE") -> socket.socket:
    """A connection with an established association (context 1: CT, context 3: Verification)."""
    sock = connect(port)
    sock.sendall(associate_rq_pdu(calling_ae))
    answer = read_pdu(sock)
    assert answer[:1] == b"\x02", answer[:10]
    return sock


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">LBB", len(data) + 2, context_id, control) + data


def p_data(*pdvs: bytes) -> bytes:
    body = b"".join(pdvs)
    return struct.pack(">BBL", 0x04, 0, len(body)) + body


def _element(group: int, elem: int, value: bytes) -> bytes:
    return struct.pack("<HHL", group, elem, len(value)) + value


def _ui(uid: str) -> bytes:
    raw = uid.encode("latin-1")
    return raw + b"\0" if len(raw) % 2 else raw


def c_store_command(sop_class: str, sop_instance: str | None, message_id: int = 1) -> bytes:
    """An encoded C-STORE-RQ command set (implicit VR little endian); ``sop_instance=None`` leaves it out."""
    body = (_element(0, 0x0002, _ui(sop_class)) + _element(0, 0x0100, struct.pack("<H", 1))
            + _element(0, 0x0110, struct.pack("<H", message_id)) + _element(0, 0x0700, struct.pack("<H", 0))
            + _element(0, 0x0800, struct.pack("<H", 0)))
    if sop_instance is not None:
        body += _element(0, 0x1000, _ui(sop_instance))
    return _element(0, 0x0000, struct.pack("<L", len(body))) + body


def c_store_pdus(command: bytes, dataset: bytes, context_id: int = 1, fragment: int = 16000) -> bytes:
    """P-DATA-TF PDUs carrying a command set and a data set."""
    out = p_data(pdv(context_id, 0x03, command))
    for start in range(0, len(dataset), fragment):
        last = start + fragment >= len(dataset)
        out += p_data(pdv(context_id, 0x02 if last else 0x00, dataset[start : start + fragment]))
    return out


def dataset_bytes(path: Path) -> bytes:
    """The data set of a DICOM file, as encoded in it (without preamble and file meta)."""
    with open(path, "rb") as fp:
        _ts, offset = read_file_meta(fp)
    return path.read_bytes()[offset:]


def store_status(sock: socket.socket) -> int | None:
    """The Status of the C-STORE-RSP read from ``sock``; None when the node aborted or closed instead."""
    data = read_pdu(sock)
    if not data or data[0] != 0x04:
        return None
    body = data[6 + 6 :]
    offset = 0
    while offset + 8 <= len(body):
        group, elem, length = struct.unpack_from("<HHL", body, offset)
        if (group, elem) == (0, 0x0900):
            return struct.unpack_from("<H", body, offset + 8)[0]
        offset += 8 + length
    return None


def closed_by_node(sock: socket.socket, within_s: float) -> bool:
    """True when the node closes ``sock`` within ``within_s`` (whatever it sends before)."""
    deadline = time.monotonic() + within_s
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def drip(sock: socket.socket, payload: bytes, every_s: float, until_s: float) -> bool:
    """Send ``payload`` one byte every ``every_s``; True when the node closed the connection before ``until_s``."""
    deadline = time.monotonic() + until_s
    for byte in payload:
        if time.monotonic() > deadline:
            return False
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return True
        if closed_by_node(sock, every_s):
            return True
    return False


def random_bytes(n: int) -> bytes:
    return os.urandom(n)
