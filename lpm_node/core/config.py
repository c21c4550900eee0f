"""Node configuration: a TOML file (see config/lpm-node.toml) plus command-line overrides."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Destination:
    """A DICOM peer that receives the node's results."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Parse ``AET@HOST:PORT``."""
        try:
            ae_title, rest = text.split("@", 1)
            host, port = rest.rsplit(":", 1)
            return cls(ae_title=ae_title.strip(), host=host.strip(), port=int(port))
        except ValueError as exc:
            raise ValueError(f"destination {text!r} is not of the form AET@HOST:PORT") from exc

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass
class NodeSettings:
    ae_title: str = "LPM_NODE"
    host: str = "127.0.0.1"
    port: int = 11112
    data_dir: str = "./lpm-data"
    database_url: str = ""  # empty: sqlite:///<data_dir>/audit.sqlite
    allowed_ae_titles: list[str] = field(default_factory=list)  # empty: any caller
    allowed_hosts: list[str] = field(default_factory=list)  # empty: any address
    min_free_disk_mb: int = 512
    spool_quota_mb: int = 0  # 0: no quota
    journal_mb: int = 256  # write-ahead journal of the spool (preallocated); 0: each file synced on its own
    max_associations: int = 16
    measure: bool = True  # False: receive, decide and queue only (e.g. while checking the routing rules)


@dataclass
class SeriesSettings:
    stable_seconds: float = 30.0


@dataclass
class RuleSettings:
    modalities: list[str] = field(default_factory=lambda: ["CT"])
    min_slices: int = 40
    min_z_coverage_mm: float = 150.0
    min_slice_thickness_mm: float = 0.5
    max_slice_thickness_mm: float = 5.0
    contrast_keywords: list[str] = field(
        default_factory=lambda: [
            "C+", "contrast", "arterial", "venous", "portal", "delayed", "angio", "CTA",
            "enhanced", "nephrographic", "bolus",
        ]
    )
    abdomen_keywords: list[str] = field(
        default_factory=lambda: ["abdomen", "abdominal", "abd", "pelvis", "pelvic", "liver", "urogra"]
    )
    chest_keywords: list[str] = field(
        default_factory=lambda: ["chest", "thorax", "thoracic", "lung", "pulmonary", "LDCT", "covid"]
    )
    excluded_image_type_words: list[str] = field(
        default_factory=lambda: ["LOCALIZER", "DERIVED", "SECONDARY", "MPR", "MIP", "REFORMATTED", "PROJECTION"]
    )


@dataclass
class ModelSettings:
    folder: str = ""  # nnU-Net v2 model folder; required to measure (serve refuses to start without one)
    folds: list[str] = field(default_factory=lambda: ["0"])
    checkpoint: str = "checkpoint_final.pth"
    device: str = "auto"  # auto | cuda | cpu
    profile: str = ""  # empty: taken from the model folder or the default "liver=1"
    threads: int = 0  # 0: number of CPU cores
    mirroring: bool = False  # test-time mirroring (slower, slightly smoother)
    resampling: str = "fast"  # fast: SimpleITK to and from the model spacing | nnunet: nnU-Net's own resampling


@dataclass
class MeasurementSettings:
    threshold_hu: float = 40.0  # DL-parenchymal below this: moderate-to-severe steatosis
    # Any of these makes the category not_assessable (the faithful value is still reported):
    min_liver_volume_ml: float = 200.0  # liver volume in view below this
    max_roi_sd_hu: float = 30.0  # SD of HU over the ROI pixels above this
    min_roi_in_liver_fraction: float = 0.9  # an ROI disk less inside the liver than this
    plausible_min_hu: float = -100.0  # ROI mean outside plausible_min_hu .. plausible_max_hu (unenhanced liver)
    plausible_max_hu: float = 100.0
    max_faithful_robust_difference_hu: float = 10.0  # DL-parenchymal and the robust estimate further apart


@dataclass
class OutputSettings:
    omit_empty_frames: bool = True
    key_image: bool = True
    destinations: list[str] = field(default_factory=list)  # "AET@HOST:PORT"
    reply_to_sender: bool = False
    reply_port: int = 104
    max_attempts: int = 10
    backoff_initial_s: float = 5.0
    backoff_max_s: float = 600.0


@dataclass
class Settings:
    node: NodeSettings = field(default_factory=NodeSettings)
    series: SeriesSettings = field(default_factory=SeriesSettings)
    rules: RuleSettings = field(default_factory=RuleSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    measurement: MeasurementSettings = field(default_factory=MeasurementSettings)
    output: OutputSettings = field(default_factory=OutputSettings)

    @property
    def data_path(self) -> Path:
        return Path(self.node.data_dir).expanduser().resolve()

    @property
    def spool_path(self) -> Path:
        return self.data_path / "spool"

    @property
    def journal_path(self) -> Path:
        return self.data_path / "journal"

    @property
    def db_url(self) -> str:
        return self.node.database_url or f"sqlite:///{self.data_path / 'audit.sqlite'}"

    @property
    def destinations(self) -> list[Destination]:
        return [Destination.parse(d) for d in self.output.destinations]


def _merge(section: Any, values: dict[str, Any], where: str) -> None:
    known = {f.name for f in dataclasses.fields(section)}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"unknown setting {where}.{key} (known: {', '.join(sorted(known))})")
        setattr(section, key, value)


def load_settings(path: str | Path | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> Settings:
    """Read settings from a TOML file (optional), then apply ``{section: {key: value}}`` overrides."""
    settings = Settings()
    sections = {f.name for f in dataclasses.fields(settings)}
    data: dict[str, Any] = {}
    if path is not None:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    for name, values in list(data.items()) + list((overrides or {}).items()):
        if name not in sections:
            raise ValueError(f"unknown settings section [{name}] (known: {', '.join(sorted(sections))})")
        _merge(getattr(settings, name), {k: v for k, v in values.items() if v is not None}, name)
    for dest in settings.output.destinations:
        Destination.parse(dest)
    return settings
