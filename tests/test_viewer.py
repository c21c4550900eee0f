"""The answer in a real viewer: OHIF 3.13.2 (npm's built dist/) in Debian's chromium, driven by Playwright, reading
the phantom study with the node's SEG, SR and key image from Orthanc's DICOMweb through a same-origin proxy.

Checked from the page: the SR opens without a console error on slice k's ROI disk, drawn with one label, exactly
"DL-parenchymal ROI: <pooled value> [hnsf'U]" (no other line, no raw code, no two labels overlapping), and its
arrows step to the next disk with that disk's own label; the key image displays with its burnt-in text and the
category over it (its series description). OHIF's guided tour is marked as shown before the page loads, and
removed should it start anyway (its overlay takes the clicks). The SEG: OHIF's preview shows
coloured pixels; its "Do you want to open this Segmentation?" prompt is answered Yes, so the segmentation is loaded
onto the CT viewport (checked through OHIF's segmentationService); cornerstone3D (``window.cornerstone``) brings that
viewport to the method's slice k (the source slice of the middle ROI disk), checked by the camera's focal point lying
in that slice's plane and by the image shown; then points of the node's SEG liver frame for slice k (3 SEG pixels in
from its edge) and points of the body outside every segment (3 pixels away) are mapped from patient coordinates
(the slice's Image Position/Orientation and Pixel Spacing) to the page with the viewport's own ``worldToCanvas``, and
the screenshot must be overlay-coloured at each liver point and grey at each outside point. A not-assessable
answer to a series where the model finds no liver (no ROI, no region on the CT): its SR opens on the key image
without an error, with the category over the image and the burnt-in statement with the reasons inside the SR's
region, and no label. Screenshots go to test-artifacts/viewer/ (gitignored).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from lpm_node.answer.build import write_answer
from lpm_node.answer.geometry import roi_disks
from lpm_node.core.config import Settings
from lpm_node.demo.model import bundled_model_folder
from lpm_node.demo.orthanc import Orthanc, orthanc_available
from lpm_node.demo.phantom import make_phantom, write_ct_series
from lpm_node.imaging.measurement import QCFlag
from lpm_node.imaging.segmentation import load_segmenter
from lpm_node.node.pipeline import analyse_series
from tests.support_segmentation import FindsNoLiver
from tests.support_viewer import (
    CHROMIUM,
    JUMP_TO_INSTANCE_JS,
    ORTHANC_DICOMWEB_PLUGIN,
    REPO,
    WORLD_TO_PAGE_JS,
    ohif_dist,
    seg_probe_points,
    viewer_server,
)

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
def study(tmp_path_factory) -> tuple[list[Path], dict[str, Path], float, str, str, list[float]]:
    """A phantom chest CT and the node's answer to it (bundled model): (CT files, {kind: file}, DL value,
    SOP Instance UID of the method's slice k, the source slice of the middle ROI disk, the key image's series
    description with the category, the ROI disks' means)."""
    root = tmp_path_factory.mktemp("viewer")
    phantom = make_phantom(36.0, n_slices=64, size=256, pixel_spacing=1.4, seed=51)
    files = write_ct_series(phantom, root / "ct")
    settings = Settings()
    settings.model.folder = str(bundled_model_folder())
    result = analyse_series(files, settings, load_segmenter(settings.model))
    answer = {o.kind: o.path for o in write_answer(result, settings, root / "answer")}
    disks = [disk for _, disk in roi_disks(result)]
    middle = next((disk for disk in disks if disk.label == "slice k"), disks[len(disks) // 2])
    slice_k = str(result.source.datasets[middle.index].SOPInstanceUID)
    disk_means = [disk.mean_hu for disk in disks]
    category = pydicom.dcmread(answer["KEY"], stop_before_pixels=True).SeriesDescription
    assert category == "AI liver fat key image: moderate-to-severe steatosis"  # the phantom's liver is 36 HU
    return files, answer, float(result.measurement.dl_parenchymal_hu), slice_k, category, disk_means


@pytest.fixture(scope="module")
def no_liver_study(tmp_path_factory) -> tuple[list[Path], dict[str, Path], str]:
    """A phantom chest CT on which the bundled model finds no liver, and the node's answer to it: (CT files,
    {kind: file}, the key image's series description with the category)."""
    root = tmp_path_factory.mktemp("viewer-no-liver")
    phantom = make_phantom(55.0, n_slices=64, size=256, pixel_spacing=1.4, seed=52)
    files = write_ct_series(phantom, root / "ct")
    settings = Settings()
    settings.model.folder = str(bundled_model_folder())
    result = analyse_series(files, settings, FindsNoLiver(load_segmenter(settings.model)))
    assert result.measurement.not_assessable_reasons == [QCFlag.NO_LIVER]
    assert roi_disks(result) == []
    answer = {o.kind: o.path for o in write_answer(result, settings, root / "answer")}
    category = pydicom.dcmread(answer["KEY"], stop_before_pixels=True).SeriesDescription
    assert category == "AI liver fat key image: not assessable"
    return files, answer, category


def _coloured(png: Path, box: tuple[int, int, int, int]) -> np.ndarray:
    """Pixels inside ``box`` (left, top, right, bottom) that are not grey: overlay, annotation or burnt-in text."""
    rgb = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)[box[1]:box[3], box[0]:box[2]]
    return (np.abs(rgb[..., 0] - rgb[..., 1]) > 40) | (np.abs(rgb[..., 1] - rgb[..., 2]) > 40)


def _colour(png: Path, points: list[list[float]]) -> list[int]:
    """How far from grey the screenshot is at each page point (x, y): its largest channel difference."""
    rgb = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    spread = rgb.max(axis=2) - rgb.min(axis=2)
    return [int(spread[int(y), int(x)]) for x, y in points]


def _accept_seg(page) -> bool:  # noqa: ANN001
    """Answer Yes to OHIF's "Do you want to open this Segmentation?" prompt; False if there was none."""
    page.get_by_text("Do you want to open this Segmentation?").first.wait_for(timeout=30_000)
    try:
        page.get_by_role("button", name="Yes", exact=True).first.click(timeout=10_000)
    except playwright.Error:
        return False
    return True


# OHIF's guided tour (shepherd.js) marks a tour as shown in localStorage; marked before the page loads, it never
# starts. Should one start anyway, it is skipped, and its modal overlay, which takes the clicks, removed.
SKIP_TOURS_JS = "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))"
REMOVE_TOUR_JS = """() => {
    window.Shepherd?.activeTour?.cancel?.();
    document.querySelectorAll('.shepherd-modal-overlay-container, .shepherd-element').forEach(e => e.remove());
    return document.querySelectorAll('.shepherd-modal-overlay-container, .shepherd-element').length;
}"""
SVG_TEXTS_JS = """els => els.map(e => {
    const box = e.getBoundingClientRect();
    return {text: e.textContent || '', box: [box.left, box.top, box.right, box.bottom]};
})"""


# The SR's region as OHIF draws it (its DICOMSRDisplay annotation): the image it is on, its labels, its points on
# the page (through the viewport showing that image) and that viewport's box; null until it is drawn.
SR_REGION_JS = """() => {
  const annotations = window.cornerstoneTools?.annotation.state.getAllAnnotations() || [];
  const sr = annotations.find((a) => a.metadata?.toolName === 'DICOMSRDisplay');
  if (!sr) return null;
  const imageId = sr.metadata.referencedImageId;
  const enabled = window.cornerstone.getEnabledElements().find(
    (e) => e.viewport.getCurrentImageId && e.viewport.getCurrentImageId() === imageId);
  if (!enabled) return null;
  const points = [];
  const walk = (v) => {
    const list = Array.isArray(v) || ArrayBuffer.isView(v);
    if (list && v.length === 3 && Array.from(v).every((n) => typeof n === 'number')) points.push(Array.from(v));
    else if (list || (v && typeof v === 'object')) Object.values(v).forEach(walk);
  };
  walk(sr.data.renderableData);
  const rect = enabled.viewport.canvas.getBoundingClientRect();
  return {
    imageId, labels: (sr.data.labels || []).map((l) => `${l.label}: ${l.value}`),
    page: points.map((p) => enabled.viewport.worldToCanvas(p)).map((c) => [rect.left + c[0], rect.top + c[1]]),
    rect: [rect.left, rect.top, rect.right, rect.bottom],
  };
}"""


def _dismiss(page) -> None:  # noqa: ANN001
    """Close OHIF's guided tour and its "Confirm and hide" notice, whatever state they are in."""
    for label in ("Skip all", "Confirm and hide"):
        button = page.get_by_role("button", name=label)
        if button.count():
            try:
                button.first.click(timeout=3000)
            except playwright.Error:
                pass
    assert page.evaluate(REMOVE_TOUR_JS) == 0


def _svg_lines(page) -> list[dict]:  # noqa: ANN001
    """Every line of annotation text on the page (one <tspan> a line) with its box on the page."""
    return page.locator("svg text tspan").evaluate_all(SVG_TEXTS_JS)


def _overlapping(boxes: list[list[float]]) -> list[tuple[int, int]]:
    return [
        (i, j) for i, a in enumerate(boxes) for j, b in enumerate(boxes[i + 1:], start=i + 1)
        if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
    ]


@contextmanager
def _viewer(tmp_path: Path, files: list[Path], answer: dict[str, Path]) -> Iterator[tuple[object, list[str]]]:
    """OHIF in chromium showing the study of ``files`` with the ``answer`` beside it, from an Orthanc holding them
    all: yields (the page, once the SR's thumbnail is listed; the console errors and page errors so far)."""
    try:
        ohif_dist()
    except (OSError, RuntimeError) as exc:  # no npm registry and no cached tarball
        pytest.skip(f"OHIF {exc}")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    config = {"Plugins": [str(ORTHANC_DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    with Orthanc(tmp_path / "orthanc", extra_config=config) as orthanc:
        for path in [*files, *answer.values()]:
            orthanc._request("POST", "/instances", Path(path).read_bytes())
        with viewer_server(orthanc.url) as base, playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.add_init_script(SKIP_TOURS_JS)
                errors: list[str] = []
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
                page.goto(f"{base}/viewer?StudyInstanceUIDs={study_uid}")
                page.get_by_text("AI liver fat report").first.wait_for(timeout=180_000)
                time.sleep(5)
                _dismiss(page)
                yield page, errors
            finally:
                browser.close()


def test_ohif_shows_the_sr_values_the_seg_overlay_and_the_key_image(study, tmp_path) -> None:
    files, answer, value, slice_k, category, disk_means = study
    with _viewer(tmp_path, files, answer) as (page, errors):
        page.screenshot(path=str(ARTIFACTS / "1-ct.png"))

        # the SR opens on slice k's ROI disk: drawn, with one label that says what it is and the pooled
        # value (OHIF prints a value's concept name, the value with 2 decimals and the UCUM unit), no raw
        # code, no other value stacked beside it, no two labels overlapping
        page.get_by_text("AI liver fat report").first.dblclick()
        page.locator("svg text", has_text=f"{value:.2f}").first.wait_for(timeout=120_000)
        time.sleep(3)
        _dismiss(page)
        page.screenshot(path=str(ARTIFACTS / "2-sr.png"))
        assert not page.get_by_text("Something went wrong").count()
        assert errors == [], errors
        lines = _svg_lines(page)
        texts = [line["text"] for line in lines]
        assert texts == [f"DL-parenchymal ROI: {value:.2f} [hnsf'U]"], texts
        assert _overlapping([line["box"] for line in lines]) == []
        assert page.locator("svg circle, svg ellipse").count() >= 1  # the ROI disk on slice k
        # its arrows step to the next disk (slice k-2), labelled with its own name and mean
        page.locator('[data-cy="viewport-action-arrows-right"]').first.click()
        page.locator("svg text", has_text="DL-parenchymal disk 1").first.wait_for(timeout=60_000)
        time.sleep(2)
        page.screenshot(path=str(ARTIFACTS / "2-sr-next-disk.png"))
        texts = [line["text"] for line in _svg_lines(page)]
        assert texts == [f"DL-parenchymal disk 1 (slice k-2): {disk_means[0]:.2f} [hnsf'U]"], texts
        assert errors == [], errors
        viewport = page.locator(".cornerstone-viewport-element, [data-viewport-uid]").first.bounding_box()
        box = tuple(int(v) for v in (viewport["x"], viewport["y"], viewport["x"] + viewport["width"],
                                     viewport["y"] + viewport["height"]))

        # the SEG: OHIF's preview shows coloured pixels; then the segmentation is loaded onto the CT
        page.get_by_text("AI liver segmentation").first.dblclick()
        time.sleep(20)
        _dismiss(page)
        page.screenshot(path=str(ARTIFACTS / "3-seg-preview.png"))
        assert _coloured(ARTIFACTS / "3-seg-preview.png", box).sum() > 2000
        assert _accept_seg(page), "no Yes button on the prompt to open the segmentation"
        time.sleep(10)
        page.screenshot(path=str(ARTIFACTS / "3-seg-loaded.png"))

        # ... then the CT viewport is brought to slice k and the SEG's liver frame there is mapped to the page
        # with the viewport's own worldToCanvas: overlay colour inside the liver, grey outside every segment
        jump = page.evaluate(JUMP_TO_INSTANCE_JS, slice_k)
        assert jump is not None, "no viewport holds the method's slice k"
        time.sleep(5)
        source = next(ds for ds in map(pydicom.dcmread, files) if ds.SOPInstanceUID == slice_k)
        liver, outside = seg_probe_points(pydicom.dcmread(answer["SEG"]), source, margin=3, count=10)
        shown = page.evaluate(WORLD_TO_PAGE_JS, {"viewportId": jump["viewportId"], "points": liver + outside})
        page.screenshot(path=str(ARTIFACTS / "3-seg.png"))
        assert shown["segmentations"], "the segmentation is not on the CT viewport"
        assert shown["imageId"] is None or slice_k in shown["imageId"]
        off_plane = np.dot(np.subtract(shown["focalPoint"], source.ImagePositionPatient),
                           shown["viewPlaneNormal"])
        assert abs(off_plane) < float(source.SliceThickness) / 2, f"viewport is {off_plane} mm off slice k"
        left, top, right, bottom = shown["rect"]
        assert all(left < x < right and top < y < bottom for x, y in shown["page"])
        colours = _colour(ARTIFACTS / "3-seg.png", shown["page"])
        assert min(colours[:len(liver)]) > 25, f"liver points not overlay-coloured: {colours}"
        assert max(colours[len(liver):]) < 10, f"points outside the segments coloured: {colours}"
        assert errors == [], errors

        # the key image: the Secondary Capture displays with its burnt-in (coloured) text, and the category
        # in the viewport's overlay (its series description)
        page.get_by_text(category).first.dblclick()
        time.sleep(10)
        _dismiss(page)
        page.screenshot(path=str(ARTIFACTS / "4-key-image.png"))
        assert _coloured(ARTIFACTS / "4-key-image.png", box).sum() > 500
        over_image = [
            found for found in (e.bounding_box() for e in page.get_by_text(category).all())
            if found and box[0] <= found["x"] < box[2] and box[1] <= found["y"] < box[3]
        ]
        assert over_image, f"{category!r} is not shown over the key image"
        assert errors == [], errors


def _yellow(png: Path, box: tuple[float, float, float, float]) -> int:
    """Pixels of the key image's not-assessable text colour (255, 200, 0) inside ``box`` (left, top, right,
    bottom)."""
    rgb = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    left, top, right, bottom = (int(round(v)) for v in box)
    r, g, b = np.moveaxis(rgb[max(top, 0):bottom, max(left, 0):right], -1, 0)
    return int(((r > 180) & (g > 130) & (g < 230) & (b < 90)).sum())


def test_ohif_opens_a_not_assessable_sr_without_a_liver_on_its_key_image(no_liver_study, tmp_path) -> None:
    """No liver, so no ROI: the SR opens on the key image without an error, with the category over the image (its
    series description) and the reasons in the statement burnt into it, which the SR's region frames; no label
    (no bare Finding Site code) beside it."""
    files, answer, category = no_liver_study
    key_image = pydicom.dcmread(answer["KEY"], stop_before_pixels=True).SOPInstanceUID
    with _viewer(tmp_path, files, answer) as (page, errors):
        page.get_by_text("AI liver fat report").first.dblclick()
        page.wait_for_function(f"({SR_REGION_JS})() !== null", timeout=120_000)
        time.sleep(5)
        _dismiss(page)
        no = page.get_by_role("button", name="No", exact=True)  # "continue tracking measurements?": just read it
        if no.count():
            no.first.click(timeout=10_000)
            time.sleep(3)
        png = ARTIFACTS / "5-sr-not-assessable.png"
        page.screenshot(path=str(png))
        assert not page.get_by_text("Something went wrong").count()
        assert errors == [], errors
        region = page.evaluate(SR_REGION_JS)
        assert key_image in region["imageId"] and region["labels"] == [], region
        assert _svg_lines(page) == []
        viewport = region["rect"]
        over_image = [
            found for found in (e.bounding_box() for e in page.get_by_text(category).all())
            if found and viewport[0] <= found["x"] < viewport[2] and viewport[1] <= found["y"] < viewport[3]
        ]
        assert over_image, f"{category!r} is not shown over the key image"
        xs, ys = zip(*region["page"], strict=True)
        frame = (min(xs), min(ys), max(xs), max(ys))
        assert _yellow(png, frame) > 1000, "the statement with the reasons is not shown inside the SR's region"
        assert _yellow(png, viewport) - _yellow(png, frame) < 50, "the SR's region does not frame the statement"
        assert errors == [], errors
