"""What every object of the answer says about the node: manufacturer, model, series numbers and descriptions,
and the study context copied from the source."""

from __future__ import annotations

import datetime as dt

from pydicom import Dataset

import lpm_node
from lpm_node.imaging.model_identity import ModelIdentity

MANUFACTURER = "lpm-node"


MODEL_NAME = lpm_node.ALGORITHM_NAME


DEVICE_SERIAL = "lpm-node"


SEG_SERIES_NUMBER = 9901


SR_SERIES_NUMBER = 9902


KEY_IMAGE_SERIES_NUMBER = 9903


KOS_SERIES_NUMBER = 9904


# Series descriptions a radiologist recognises in a series list; each says the result is AI-generated.
SEG_SERIES_DESCRIPTION = "AI liver segmentation (lpm-node)"


SR_SERIES_DESCRIPTION = "AI liver fat report (lpm-node)"


# the key image adds the category after a colon (see answer.keyimage.series_description)
KEY_IMAGE_SERIES_DESCRIPTION = "AI liver fat key image"


KOS_SERIES_DESCRIPTION = "AI liver fat key images (lpm-node)"


TEST_MODEL_NOTICE = "TEST MODEL, NOT FOR CLINICAL USE"


# Attributes copied from the source onto every output when the source has them (study and patient context that
# highdicom's constructors do not copy themselves).
COPIED_CONTEXT = ("StudyDescription", "PatientAge", "PatientSize", "PatientWeight")


def stamp_context(ds: Dataset, source: Dataset, when: dt.datetime | None = None) -> None:
    """Give an output Series Date/Time (``when``, default now) and the source's study description and patient
    age, size and weight (when the source has them)."""
    when = when or dt.datetime.now()
    ds.SeriesDate = when.strftime("%Y%m%d")
    ds.SeriesTime = when.strftime("%H%M%S")
    for keyword in COPIED_CONTEXT:
        value = source.get(keyword)
        if value not in (None, ""):
            setattr(ds, keyword, value)


def model_text(model: ModelIdentity | None) -> str:
    """The model as one line for SR text and the key image ("" when unknown)."""
    return "" if model is None else model.short()
