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

import numpy as np
from pydicom import Dataset
from scipy import ndimage

from lpm_node.answer.seg import segment_number

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


def _world(ds: Dataset, rows_cols: np.ndarray) -> list[list[float]]:
    """Patient coordinates (mm) of (row, column) pixel centres of a single-frame image."""
    origin = np.asarray(ds.ImagePositionPatient, dtype=float)
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    return [(origin + c * column_spacing * orientation[:3] + r * row_spacing * orientation[3:]).tolist()
            for r, c in rows_cols]


def seg_probe_points(seg: Dataset, source: Dataset, margin: int = 3, count: int = 6) -> tuple[list, list]:
    """World points on ``source``'s slice: (inside the SEG's liver frame, in the body outside every segment),
    each at least ``margin`` SEG pixels from a segment's edge; ``count`` of each, spread over the region."""
    liver_number = segment_number(seg, "liver")
    pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    liver = np.zeros((seg.Rows, seg.Columns), bool)
    any_segment = np.zeros_like(liver)
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence, strict=True):
        source_uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        if source_uid != source.SOPInstanceUID:
            continue
        any_segment |= frame > 0
        if int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber) == liver_number:
            liver |= frame > 0
    assert liver.sum() > 100, "the SEG has no liver on the source slice"
    hu = source.pixel_array * float(source.RescaleSlope) + float(source.RescaleIntercept)
    inside = ndimage.binary_erosion(liver, iterations=margin)
    outside = ~ndimage.binary_dilation(any_segment, iterations=margin) & ndimage.binary_erosion(
        hu > -300, iterations=margin)

    def spread(mask: np.ndarray) -> np.ndarray:
        where = np.argwhere(mask)
        return where[np.linspace(0, len(where) - 1, count).round().astype(int)]

    return _world(source, spread(inside)), _world(source, spread(outside))


# Bring the stack (or volume) viewport showing ``sop`` to that instance; returns what it did.
JUMP_TO_INSTANCE_JS = """async (sop) => {
  for (const enabled of window.cornerstone.getEnabledElements()) {
    const viewport = enabled.viewport;
    const ids = viewport.getImageIds ? viewport.getImageIds() : [];
    const index = ids.findIndex((id) => id.includes(sop));
    if (index < 0) continue;
    if (viewport.setImageIdIndex) await viewport.setImageIdIndex(index);
    else window.cornerstoneTools.utilities.jumpToSlice(viewport.element, { imageIndex: index });
    viewport.render();
    return { viewportId: viewport.id, type: viewport.type, index, count: ids.length };
  }
  return null;
}"""

# The viewport's own transform: world points -> page pixels, with its camera and the segmentations it shows.
WORLD_TO_PAGE_JS = """({ viewportId, points }) => {
  const enabled = window.cornerstone.getEnabledElements().find((e) => e.viewport.id === viewportId);
  const viewport = enabled.viewport;
  const rect = viewport.canvas.getBoundingClientRect();
  const camera = viewport.getCamera();
  const segmentations = window.services.segmentationService.getSegmentationRepresentations
    ? window.services.segmentationService.getSegmentationRepresentations(viewportId).map((r) => r.segmentationId)
    : [];
  return {
    page: points.map((p) => { const c = viewport.worldToCanvas(p); return [rect.left + c[0], rect.top + c[1]]; }),
    rect: [rect.left, rect.top, rect.right, rect.bottom],
    focalPoint: camera.focalPoint, viewPlaneNormal: camera.viewPlaneNormal,
    imageId: viewport.getCurrentImageId ? viewport.getCurrentImageId() : null,
    segmentations,
  };
}"""
