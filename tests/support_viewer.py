"""OHIF 3.13.2 (the npm tarball's built dist/) behind a same-origin server that proxies /dicom-web to Orthanc."""

from __future__ import annotations

import http.server
import shutil
import subprocess
import tarfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OHIF_VERSION = "3.13.2"
OHIF_CACHE = REPO / ".cache" / "ohif"
CHROMIUM = Path("/usr/bin/chromium")
ORTHANC_DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")

APP_CONFIG = """window.config = {
  routerBasename: '/',
  showStudyList: true,
  extensions: [],
  modes: [],
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  defaultDataSourceName: 'dicomweb',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'dicomweb',
    configuration: {
      friendlyName: 'Orthanc (test)',
      name: 'orthanc',
      wadoUriRoot: window.location.origin + '/dicom-web',
      qidoRoot: window.location.origin + '/dicom-web',
      wadoRoot: window.location.origin + '/dicom-web',
      qidoSupportsIncludeField: false,
      imageRendering: 'wadors',
      thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true,
      supportsFuzzyMatching: false,
      supportsWildcard: true,
      omitQuotationForMultipartRequest: true,
      bulkDataURI: { enabled: true },
    },
  }],
};
"""


def ohif_dist() -> Path:
    """The built OHIF viewer, unpacked from ``npm pack @ohif/app@3.13.2`` into .cache/ohif (fetched when
    missing)."""
    dist = OHIF_CACHE / "package" / "dist"
    if (dist / "index.html").exists():
        return dist
    OHIF_CACHE.mkdir(parents=True, exist_ok=True)
    tarball = OHIF_CACHE / f"ohif-app-{OHIF_VERSION}.tgz"
    if not tarball.exists():
        if shutil.which("npm") is None:
            raise FileNotFoundError("npm is needed to fetch @ohif/app (or put its tarball in .cache/ohif)")
        subprocess.run(["npm", "pack", f"@ohif/app@{OHIF_VERSION}"], cwd=OHIF_CACHE, check=True,
                       capture_output=True, timeout=600)
    with tarfile.open(tarball) as archive:
        archive.extractall(OHIF_CACHE, filter="data")
    return dist


def _handler(dist: Path, orthanc_url: str) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            super().__init__(*args, directory=str(dist), **kwargs)

        def log_message(self, *_args) -> None:  # noqa: ANN002
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path.startswith("/dicom-web"):
                self._proxy()
                return
            path = self.path.split("?", 1)[0]
            if path == "/app-config.js":
                body = APP_CONFIG.encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/javascript")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            if not (dist / path.lstrip("/")).is_file():
                self.path = "/index.html"  # the single-page app's routes (/viewer, ...)
            super().do_GET()

        def _proxy(self) -> None:
            headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept",)}
            request = urllib.request.Request(orthanc_url + self.path, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    body, status, content_type = response.read(), response.status, response.headers["Content-Type"]
            except urllib.error.HTTPError as error:
                body, status, content_type = error.read(), error.code, error.headers.get("Content-Type", "")
            self.send_response(status)
            if content_type:
                self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


@contextmanager
def viewer_server(orthanc_url: str) -> Iterator[str]:
    """Serve OHIF at / and Orthanc's DICOMweb at /dicom-web on 127.0.0.1 (a free port); yields the base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(ohif_dist(), orthanc_url))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
