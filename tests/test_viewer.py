"""The answer in a real viewer: OHIF 3.13.2 (npm's built dist/) in Debian's chromium, driven by Playwright, reading
the phantom study with the node's SEG, SR and key image from Orthanc's DICOMweb through a same-origin proxy.

Checked from the page: the SR opens without a console error, its ROI disk and organ outlines are drawn and the
DL-parenchymal value is on screen; the SEG overlay is drawn in colour inside the liver on the slice shown; the key
image displays with its burnt-in text. Screenshots go to test-artifacts/viewer/ (gitignored).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from lpm_node.core.config import Settings
from lpm_node.demo.model import bundled_model_folder
from lpm_node.demo.orthanc import Orthanc, orthanc_available
from lpm_node.demo.phantom import make_phantom, write_ct_series
from lpm_node.imaging.segmentation import load_segmenter
from lpm_node.node.pipeline import analyse_series, write_answer
from tests.support_viewer import CHROMIUM, ORTHANC_DICOMWEB_PLUGIN, REPO, ohif_dist, viewer_server

playwright = pytest.importorskip("playwright.sync_api")

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium not installed"),
    pytest.mark.skipif(not orthanc_available() or not ORTHANC_DICOMWEB_PLUGIN.exists(),
                       reason="Orthanc with orthanc-dicomweb not installed"),
    pytest.mark.timeout(900),
]

ARTIFACTS = REPO / "test-artifacts" / "viewer"
BROWSER_ARGS = ["--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--no-sandbox"]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[list[Path], dict[str, Path], float]:
    """A phantom chest CT and the node's answer to it (bundled model): (CT files, {kind: file}, DL value)."""
    root = tmp_path_factory.mktemp("viewer")
    phantom = make_phantom(36.0, n_slices=64, size=256, pixel_spacing=1.4, seed=51)
    files = write_ct_series(phantom, root / "ct")
    settings = Settings()
    settings.model.folder = str(bundled_model_folder())
    result = analyse_series(files, settings, load_segmenter(settings.model))
    answer = {o.kind: o.path for o in write_answer(result, settings, root / "answer")}
    return files, answer, float(result.measurement.dl_parenchymal_hu)


def _coloured(png: Path, box: tuple[int, int, int, int]) -> np.ndarray:
    """Pixels inside ``box`` (left, top, right, bottom) that are not grey: overlay, annotation or burnt-in text."""
    rgb = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)[box[1]:box[3], box[0]:box[2]]
    return (np.abs(rgb[..., 0] - rgb[..., 1]) > 40) | (np.abs(rgb[..., 1] - rgb[..., 2]) > 40)


def _dismiss(page) -> None:  # noqa: ANN001
    for label in ("Skip all", "Confirm and hide"):
        try:
            page.get_by_text(label).first.click(timeout=3000)
        except playwright.Error:
            pass


def test_ohif_shows_the_sr_values_the_seg_overlay_and_the_key_image(study, tmp_path) -> None:
    try:
        ohif_dist()
    except (OSError, RuntimeError) as exc:  # no npm registry and no cached tarball
        pytest.skip(f"OHIF {exc}")
    files, answer, value = study
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    config = {"Plugins": [str(ORTHANC_DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    with Orthanc(tmp_path / "orthanc", extra_config=config) as orthanc:
        for path in [*files, answer["SEG"], answer["SR"], answer["KEY"], answer["KOS"]]:
            orthanc._request("POST", "/instances", Path(path).read_bytes())
        with viewer_server(orthanc.url) as base, playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                errors: list[str] = []
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
                page.goto(f"{base}/viewer?StudyInstanceUIDs={study_uid}")
                page.get_by_text("AI liver fat report").first.wait_for(timeout=180_000)
                time.sleep(5)
                _dismiss(page)
                page.screenshot(path=str(ARTIFACTS / "1-ct.png"))

                # the SR: no error, the ROI and outlines drawn, the DL-parenchymal value on screen
                page.get_by_text("AI liver fat report").first.dblclick()
                page.locator("svg text", has_text=f"{value:.2f}").first.wait_for(timeout=120_000)
                time.sleep(3)
                page.screenshot(path=str(ARTIFACTS / "2-sr.png"))
                assert not page.get_by_text("Something went wrong").count()
                assert errors == [], errors
                labels = " ".join(page.locator("svg text").evaluate_all("els => els.map(e => e.textContent || '')"))
                assert f"Attenuation Coefficient: {value:.2f}" in labels
                assert page.locator("svg circle, svg ellipse").count() >= 1  # the ROI disk on slice k
                viewport = page.locator(".cornerstone-viewport-element, [data-viewport-uid]").first.bounding_box()
                box = tuple(int(v) for v in (viewport["x"], viewport["y"], viewport["x"] + viewport["width"],
                                             viewport["y"] + viewport["height"]))

                # the SEG: coloured overlay pixels appear in the viewport once it is loaded
                page.get_by_text("AI liver segmentation").first.dblclick()
                time.sleep(20)
                _dismiss(page)
                page.screenshot(path=str(ARTIFACTS / "3-seg.png"))
                assert _coloured(ARTIFACTS / "3-seg.png", box).sum() > 2000
                assert errors == [], errors

                # the key image: the Secondary Capture displays with its burnt-in (coloured) text
                page.get_by_text("AI liver fat key image").first.dblclick()
                time.sleep(10)
                page.screenshot(path=str(ARTIFACTS / "4-key-image.png"))
                assert _coloured(ARTIFACTS / "4-key-image.png", box).sum() > 500
                assert errors == [], errors
            finally:
                browser.close()
