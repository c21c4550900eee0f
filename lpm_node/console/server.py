"""Serving the console: ``lpm-node console`` alone, or beside the node (``serve --console``) in a thread."""

from __future__ import annotations

import logging
import signal
import threading

import uvicorn

from lpm_node.console.app import build_app
from lpm_node.console.security import check_exposure, login_required
from lpm_node.core.config import Settings

LOG = logging.getLogger(__name__)


def _server(settings: Settings) -> uvicorn.Server:
    c = settings.console
    check_exposure(c)
    config = uvicorn.Config(
        build_app(settings), host=c.host, port=c.port, log_level="info", access_log=True,
        ssl_certfile=c.tls_certificate or None, ssl_keyfile=c.tls_private_key or None,
        proxy_headers=c.behind_tls_proxy, server_header=False,
    )
    scheme = "https" if c.tls_certificate else "http"
    LOG.info("console on %s://%s:%d/ (%s)", scheme, c.host, c.port,
             "login required" if login_required(c) else "loopback, no login")
    return uvicorn.Server(config)


def run_console(settings: Settings) -> int:
    """Serve the console until SIGINT or SIGTERM; exit status 0 after an orderly stop."""
    server = _server(settings)
    # uvicorn re-raises the stopping signal once it has shut down: here it only ends the command, with status 0
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    LOG.info("console stopped")
    return 0


def start_console_thread(settings: Settings) -> uvicorn.Server:
    """Serve the console in a daemon thread beside ``serve`` (uvicorn leaves the signals to the main thread);
    ``server.should_exit = True`` stops it."""
    server = _server(settings)
    threading.Thread(target=server.run, name="console", daemon=True).start()
    return server
