"""DL-parenchymal liver attenuation (Zhang et al., Sci Rep 2024) and the node's QC on it.

Works on arrays in the method's grid: (z, y, x), 0.7 x 0.7 x 2.5 mm, x toward the patient's left.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

STEATOSIS = "moderate_to_severe_steatosis"
NO_STEATOSIS = "no_moderate_to_severe_steatosis"
NOT_ASSESSABLE = "not_assessable"


@dataclass
class Measurement:
    """What the node measured on one series (HU values are means; None when not measurable)."""

    dl_parenchymal_hu: float | None
    dl_volumetric_hu: float | None
    liver_volume_ml: float
    category: str  # STEATOSIS | NO_STEATOSIS | NOT_ASSESSABLE
    threshold_hu: float
    roi_slices: list[int] = field(default_factory=list)  # z indices on the method grid
    roi_centres: list[list[int]] = field(default_factory=list)  # [z, y, x] on the method grid
    roi_pixels: list[int] = field(default_factory=list)  # pixels per ROI disk
    roi_sd_hu: float | None = None  # SD of HU over the three ROIs
    robust_parenchymal_hu: float | None = None  # beyond the paper: resists vessels and lesions
    roi_in_liver_fraction: float | None = None
    qc_flags: list[str] = field(default_factory=list)
    spleen_hu: float | None = None
    liver_minus_spleen_hu: float | None = None

    def to_dict(self) -> dict:
        """Plain JSON-ready dict."""
        return asdict(self)
