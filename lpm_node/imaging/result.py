"""What the imaging half hands the answer: one measured series (``SeriesResult``) and its stage timer."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from lpm_node.imaging.loading import CTSeries
from lpm_node.imaging.measurement import Measurement
from lpm_node.imaging.model_identity import ModelIdentity

STAGES = ("load", "resample", "segment", "measure", "write")


@dataclass
class SeriesResult:
    """Everything the imaging half produced for one series: the source series, the method-grid image and masks,
    the measurement and its ROI, the model, and the measured instances."""

    source: CTSeries
    method_image: sitk.Image  # HU on the 0.7 x 0.7 x 2.5 mm grid
    masks: dict[str, np.ndarray]  # structure -> uint8 (z, y, x) on the method grid
    roi: np.ndarray  # uint8 (z, y, x) on the method grid
    measurement: Measurement
    device: str
    model: str
    model_identity: ModelIdentity
    instances: tuple[tuple[str, str], ...] = ()  # measured source instances: (SOP Instance UID, file SHA-256)
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds

    @property
    def series_instance_uid(self) -> str:
        return self.source.series_instance_uid

    def summary(self) -> dict[str, Any]:
        """JSON-ready: the measurement plus identity, device, model, timings and loader warnings."""
        return {
            "series_instance_uid": self.source.series_instance_uid,
            "study_instance_uid": self.source.study_instance_uid,
            "status": "measured",
            **self.measurement.to_dict(),
            "device": self.device,
            "model": self.model,
            "model_identity": self.model_identity.as_dict(),
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "warnings": list(self.source.warnings),
        }


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Add the seconds the ``with`` block takes to ``timings[stage]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0
