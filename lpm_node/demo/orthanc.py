"""A local Orthanc PACS on 127.0.0.1 (free DICOM and HTTP ports, its own storage and config).

Used by ``lpm-node demo`` as the receiving PACS when Orthanc is installed, and by the tests as the real peer.
``stop()`` then ``start()`` restarts it on the same ports and the same storage (a PACS going down and
coming back). ``freeze()``/``thaw()`` suspend and resume the process (a PACS that accepts TCP connections
but does not answer).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path
from typing import Any

ORTHANC_BIN = os.environ.get("ORTHANC_BIN", "/usr/sbin/Orthanc")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """Last-resort cleanup (garbage collection or interpreter exit): never leave an Orthanc running."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGCONT)
        except ProcessLookupError:
            return
        proc.kill()
        proc.wait(timeout=10)


def orthanc_available() -> bool:
    """Whether the Orthanc executable is installed."""
    return Path(ORTHANC_BIN).exists() or shutil.which("Orthanc") is not None


class Orthanc:
    """One Orthanc process with its own folder, config file, storage and ports (loopback only)."""

    def __init__(
        self,
        workdir: Path,
        *,
        aet: str = "ORTHANC",
        check_called_aet: bool = False,
        lua: str | None = None,
        extra_config: dict[str, Any] | None = None,
        start_timeout_s: float = 60.0,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.host = "127.0.0.1"
        self.dicom_port = free_port()
        self.http_port = free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        self.storage = self.workdir / "storage"
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        config: dict[str, Any] = {
            "Name": "lpm-local-orthanc",
            "StorageDirectory": str(self.storage),
            "IndexDirectory": str(self.storage),
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": check_called_aet,
            "DicomCheckModalityHost": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "UnknownSopClassAccepted": True,
            "DicomModalities": {},
            "SaveJobs": False,
            "ConcurrentJobs": 1,
            "HttpThreadsCount": 4,
            "DicomThreadsCount": 2,
            "StableAge": 1,
            "OverwriteInstances": False,
        }
        if lua is not None:
            lua_path = self.workdir / "filter.lua"
            lua_path.write_text(lua)
            config["LuaScripts"] = [str(lua_path)]
        config.update(extra_config or {})
        self.config_path.write_text(json.dumps(config, indent=2))

    # -- process -----------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL of the REST API."""
        return f"http://{self.host}:{self.http_port}"

    @property
    def running(self) -> bool:
        """Whether the Orthanc process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Orthanc:
        """Start Orthanc (same ports and storage as before) and wait until its REST API answers."""
        if self.running:
            return self
        env = dict(os.environ, TCP_NODELAY="1")
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        try:
            self._proc = subprocess.Popen(
                [ORTHANC_BIN, "--no-jobs", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
            )
        finally:
            log.close()
        weakref.finalize(self, _terminate, self._proc)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self._proc.returncode}: {self.log_tail()}")
            try:
                self.get("/system")
                if self._dicom_port_open():
                    return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"Orthanc did not answer within {self.start_timeout_s} s: {self.log_tail()}")

    def _dicom_port_open(self) -> bool:
        try:
            with socket.create_connection((self.host, self.dicom_port), timeout=1.0):
                return True
        except OSError:
            return False

    def stop(self, graceful: bool = True) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL after 20 s; at once when not ``graceful``); the storage is kept."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        if not graceful:
            _terminate(proc)
            return
        try:
            os.kill(proc.pid, signal.SIGCONT)  # in case it was frozen
        except ProcessLookupError:
            return
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def freeze(self) -> None:
        """Suspend the process (SIGSTOP): connections are accepted by the kernel, nothing answers."""
        if self._proc is not None:
            os.kill(self._proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """Resume a frozen process (SIGCONT)."""
        if self._proc is not None:
            os.kill(self._proc.pid, signal.SIGCONT)

    def log_tail(self, chars: int = 3000) -> str:
        """The end of Orthanc's log."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(graceful=False)  # the end of a test: nothing to keep, no need to wait for a clean shutdown

    # -- REST ----------------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: bytes | None = None, timeout: float = 30.0) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=timeout) as rsp:  # noqa: S310 - loopback URL built here
            return rsp.read()

    def get(self, path: str) -> Any:
        """GET ``path`` and decode the JSON answer."""
        return json.loads(self._request("GET", path))

    def post(self, path: str, payload: Any) -> Any:
        """POST JSON ``payload`` to ``path`` and decode the JSON answer."""
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        answer = self._request("POST", path, raw)
        return json.loads(answer) if answer else None

    def put(self, path: str, body: bytes | str) -> None:
        """PUT ``body`` to ``path``."""
        self._request("PUT", path, body.encode() if isinstance(body, str) else body)

    def instances(self) -> list[str]:
        """Orthanc ids of every stored instance."""
        return list(self.get("/instances"))

    def studies(self) -> list[str]:
        """Orthanc ids of every stored study."""
        return list(self.get("/studies"))

    def series(self) -> list[str]:
        """Orthanc ids of every stored series."""
        return list(self.get("/series"))

    def instance_tags(self, instance_id: str, simplify: bool = True) -> dict[str, Any]:
        """The tags of one instance (keyword -> value when ``simplify``)."""
        return dict(self.get(f"/instances/{instance_id}/{'simplified-tags' if simplify else 'tags'}"))

    def instance_file(self, instance_id: str) -> bytes:
        """The stored DICOM file of one instance."""
        return self._request("GET", f"/instances/{instance_id}/file")

    def find_by_sop_uid(self, sop_instance_uid: str) -> list[str]:
        """Orthanc ids of the instances with this SOPInstanceUID (at most one in Orthanc)."""
        query = {"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}}
        return list(self.post("/tools/find", query))

    def statistics(self) -> dict[str, Any]:
        """Counts of patients, studies, series, instances."""
        return dict(self.get("/statistics"))
