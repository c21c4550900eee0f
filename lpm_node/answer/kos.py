"""Key Object Selection document (TID 2010) in the source study, so a PACS's key-image feature shows the result."""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes

import lpm_node
from lpm_node.answer.equipment import (
    KOS_SERIES_DESCRIPTION,
    KOS_SERIES_NUMBER,
    MANUFACTURER,
    MODEL_NAME,
    TEST_MODEL_NOTICE,
    stamp_context,
)
from lpm_node.answer.uids import DEVICE_OBSERVER_UID, ContentIdentity

DOCUMENT_TITLE = codes.cid7010.OfInterest  # (113000, DCM, "Of Interest"), CID 7010


def kos_description(content: ContentIdentity) -> str:
    """Key Object Description: what the selection holds, marked as AI-generated (and as a test model's)."""
    text = "AI-generated liver fat (hepatic steatosis) result of lpm-node: key image, report and segmentation"
    if content.model is not None and content.model.test_model:
        text = f"{TEST_MODEL_NOTICE}. {text}"
    return text


def build_kos(objects: Sequence[Dataset], content: ContentIdentity, source: Dataset) -> Dataset:
    """A Key Object Selection document selecting ``objects`` (key image first, then SR and SEG).

    The objects must belong to the source study; ``source`` is a source CT image, whose study description and
    patient age are copied. UIDs are derived from ``content``.
    """
    if not objects:
        raise ValueError("a key object selection needs at least one object")
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=DEVICE_OBSERVER_UID, name=lpm_node.ALGORITHM_NAME, manufacturer_name=MANUFACTURER,
            model_name=MODEL_NAME,
        ),
    )
    selection = hd.ko.KeyObjectSelection(
        document_title=DOCUMENT_TITLE,
        referenced_objects=list(objects),
        observer_device_context=observer,
        description=kos_description(content),
    )
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=list(objects),
        content=selection,
        series_instance_uid=content.uid("kos-series"),
        series_number=KOS_SERIES_NUMBER,
        sop_instance_uid=content.uid("kos-instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
    )
    # TID 2010 rows 8 and 10: the selected IMAGE and COMPOSITE items carry no concept name (purpose of reference).
    for item in kos.ContentSequence:
        if item.ValueType in ("IMAGE", "COMPOSITE") and "ConceptNameCodeSequence" in item:
            del item.ConceptNameCodeSequence
    kos.SeriesDescription = KOS_SERIES_DESCRIPTION
    stamp_context(kos, source)
    return kos
