"""Node configuration: a TOML file (see config/lpm-node.toml) plus command-line overrides.

Every value is checked against the type and bounds of its field (pydantic, strict: no "11112" for a port, no
1 for true); a wrong or unknown key is refused with the key and the file named (``ConfigError``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from lpm_node.core.destinations import Destination, DestinationSetting

Port = Annotated[int, Field(ge=1, le=65535)]
AETitle = Annotated[str, Field(min_length=1, max_length=16)]
Count = Annotated[int, Field(ge=0)]
AtLeastOne = Annotated[int, Field(ge=1)]
Amount = Annotated[float, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
Role = Literal["all", "receiver", "worker", "sender"]


class ConfigError(ValueError):
    """A setting that cannot be used: the message names the source (file or command line) and the key."""

LOG = logging.getLogger(__name__)


@dataclass
class NodeSettings:
    ae_title: AETitle = "LPM_NODE"
    host: str = "127.0.0.1"
    port: Port = 11112
    data_dir: str = "./lpm-data"
    database_url: str = ""  # empty: sqlite:///<data_dir>/audit.sqlite
    allowed_ae_titles: list[str] = field(default_factory=list)  # empty: any caller
    allowed_hosts: list[str] = field(default_factory=list)  # empty: any address
    min_free_disk_mb: Count = 512
    spool_quota_mb: Count = 0  # 0: no quota
    max_associations: AtLeastOne = 16  # at once; more: A-ASSOCIATE-RJ, local limit exceeded
    max_connections: AtLeastOne = 64  # open TCP connections (associated or not); more are closed at once
    associate_timeout_s: Positive = 10.0  # total time from connection to association (whatever the peer sends)
    idle_timeout_s: Positive = 60.0  # an association with no complete PDU for this long is aborted
    tls_certificate: str = ""  # PEM certificate of the node; set with tls_private_key to speak DICOM TLS only
    tls_private_key: str = ""  # PEM private key of tls_certificate
    tls_ca_certificates: str = ""  # PEM bundle of the CAs whose client certificates are trusted
    tls_require_client_certificate: bool = False  # refuse peers without a certificate signed by those CAs
    measure: bool = True  # False: receive, decide and queue only (e.g. while checking the routing rules)
    stop_grace_seconds: Amount = 10.0  # a job still running this long after a stop is queued again (not a crash)
    role: Role = "all"  # all | receiver | worker | sender (several processes need a PostgreSQL database_url)
    reuse_port: bool = False  # SO_REUSEPORT: several receiver processes on one machine share the port
    heartbeat_seconds: Positive = 5.0  # each process notes that it is alive this often (role_heartbeats)
    stalled_after_seconds: Positive = 30.0  # a worker silent this long has its job taken over by another


@dataclass
class SeriesSettings:
    stable_seconds: Positive = 30.0
    release_grace_seconds: float = 2.0  # complete this long after its associations were released; < 0: off


@dataclass
class RuleSettings:
    modalities: list[str] = field(default_factory=lambda: ["CT"])
    min_slices: Count = 40
    min_z_coverage_mm: Amount = 150.0
    min_slice_thickness_mm: Amount = 0.5
    max_slice_thickness_mm: Positive = 5.0
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
    folder: str = ""  # nnU-Net v2 model folder or v1 result folder; required to measure (serve refuses without)
    folds: list[str] = field(default_factory=lambda: ["0"])
    checkpoint: str = "checkpoint_final.pth"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    profile: str = ""  # empty: taken from the model folder or the default "liver=1"
    threads: Count = 0  # 0: number of CPU cores
    mirroring: bool = False  # test-time mirroring (slower, slightly smoother)
    resampling: Literal["fast", "nnunet"] = "fast"  # fast: SimpleITK to/from the model spacing; nnunet: its own


@dataclass
class MeasurementSettings:
    threshold_hu: float = 40.0  # DL-parenchymal below this: moderate-to-severe steatosis
    # Any of these makes the category not_assessable (the faithful value is still reported):
    min_liver_volume_ml: Amount = 200.0  # liver volume in view below this
    max_roi_sd_hu: Positive = 30.0  # SD of HU over the ROI pixels above this
    min_roi_in_liver_fraction: Annotated[float, Field(ge=0, le=1)] = 0.9  # an ROI disk less inside the liver than this
    plausible_min_hu: float = -100.0  # ROI mean outside plausible_min_hu .. plausible_max_hu (unenhanced liver)
    plausible_max_hu: float = 100.0
    max_faithful_robust_difference_hu: Positive = 10.0  # DL-parenchymal and the robust estimate further apart
    # One ROI disk unlike the liver (reported; not_assessable only when the category without it differs): more than
    # this share of its pixels beyond 3 robust SDs of the liver's median, or its mean this far from the robust value.
    max_roi_disk_outlier_fraction: Annotated[float, Field(ge=0, le=1)] = 0.10
    max_roi_disk_difference_hu: Positive = 8.0


@dataclass
class OutputSettings:
    omit_empty_frames: bool = True
    key_image: bool = True
    destinations: list[DestinationSetting] = field(default_factory=list)  # "AET@HOST:PORT", parsed when read
    reply_to_sender: bool = False
    reply_port: Port = 104
    max_attempts: Count = 0  # 0: no limit by count, only retry_hours
    retry_hours: Positive = 48.0  # a delivery failing for this long since it was queued is dead-lettered
    backoff_initial_s: Positive = 5.0
    backoff_max_s: Positive = 600.0
    tls: bool = False  # send to destinations over DICOM TLS (see [node] tls_*)


class ConsoleUser(BaseModel):
    """One person who may sign in to the console: a password hash (argon2 or bcrypt) and a role."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(min_length=1, max_length=64)]
    password_hash: Annotated[str, Field(pattern=r"^\$(argon2(id|i|d)|2[abxy])\$")]
    role: Literal["viewer", "admin"] = "viewer"  # viewers read; only admins act


@dataclass
class ConsoleSettings:
    host: str = "127.0.0.1"  # anywhere but loopback, every page and API call needs a login
    port: Port = 8480
    users: list[ConsoleUser] = field(default_factory=list)
    viewer_url: str = ""  # e.g. https://ohif.example/viewer?StudyInstanceUIDs={study_uid}: a series' story links it
    tls_certificate: str = ""  # PEM: the console speaks HTTPS itself (cookies are then Secure)
    tls_private_key: str = ""
    behind_tls_proxy: bool = False  # a TLS-terminating proxy in front: cookies are Secure
    session_minutes: AtLeastOne = 480
    login_attempts_per_minute: AtLeastOne = 5  # per address and per user name; more are refused for a minute
    echo_interval_s: Positive = 60.0  # how often the destinations are C-ECHOed for the health page
    page_size: AtLeastOne = 50


@dataclass
class Settings:
    node: NodeSettings = field(default_factory=NodeSettings)
    series: SeriesSettings = field(default_factory=SeriesSettings)
    rules: RuleSettings = field(default_factory=RuleSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    measurement: MeasurementSettings = field(default_factory=MeasurementSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    console: ConsoleSettings = field(default_factory=ConsoleSettings)

    @property
    def data_path(self) -> Path:
        return Path(self.node.data_dir).expanduser().resolve()

    @property
    def spool_path(self) -> Path:
        return self.data_path / "spool"

    @property
    def retired_journal_path(self) -> Path:
        """The folder of the write-ahead journal of earlier versions (removed at start)."""
        return self.data_path / "journal"

    @property
    def delivered_path(self) -> Path:
        """Where each delivered result is also noted outside the database (read by ``lpm-node reindex``)."""
        return self.data_path / "delivered"

    @property
    def db_url(self) -> str:
        return self.node.database_url or f"sqlite:///{self.data_path / 'audit.sqlite'}"

    @property
    def destinations(self) -> list[Destination]:
        return list(self.output.destinations)


@functools.cache
def _field_adapters(section_type: type) -> dict[str, TypeAdapter]:
    hints = typing.get_type_hints(section_type, include_extras=True)
    return {f.name: TypeAdapter(hints[f.name]) for f in dataclasses.fields(section_type)}


# Settings of earlier versions: ignored with a one-line warning instead of refusing the file.
RETIRED_SETTINGS = {
    "node.journal_mb": "node.journal_mb is no longer used (every instance is synced to the spool before it is "
                       "acknowledged); remove it from the configuration",
}


def _merge(section: Any, values: dict[str, Any], where: str, source: str) -> None:
    adapters = _field_adapters(type(section))
    for key, value in values.items():
        if f"{where}.{key}" in RETIRED_SETTINGS:
            LOG.warning("%s: %s", source, RETIRED_SETTINGS[f"{where}.{key}"])
            continue
        if key not in adapters:
            raise ConfigError(f"{source}: unknown setting [{where}] {key} (known: {', '.join(sorted(adapters))})")
        try:
            checked = adapters[key].validate_python(value, strict=True)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'item ' + '.'.join(map(str, e['loc'])) + ': ' if e['loc'] else ''}"
                f"{e.get('ctx', {}).get('error') or e['msg']}"  # a ValueError of a parser (a destination) as it says
                for e in exc.errors()
            )
            raise ConfigError(f"{source}: [{where}] {key} = {value!r}: {problems}") from None
        setattr(section, key, checked)


def _check_together(settings: Settings, source: str) -> None:
    rules, output = settings.rules, settings.output
    if rules.min_slice_thickness_mm > rules.max_slice_thickness_mm:
        raise ConfigError(f"{source}: [rules] min_slice_thickness_mm ({rules.min_slice_thickness_mm}) is above "
                          f"max_slice_thickness_mm ({rules.max_slice_thickness_mm})")
    if output.backoff_initial_s > output.backoff_max_s:
        raise ConfigError(f"{source}: [output] backoff_initial_s ({output.backoff_initial_s}) is above "
                          f"backoff_max_s ({output.backoff_max_s})")
    console = settings.console
    if bool(console.tls_certificate) != bool(console.tls_private_key):
        raise ConfigError(f"{source}: [console] tls_certificate and tls_private_key go together")
    names = [u.name for u in console.users]
    if len(names) != len(set(names)):
        raise ConfigError(f"{source}: [console] users: a user name is listed twice")
    node = settings.node
    if node.role != "all" and not node.database_url.startswith("postgres"):
        raise ConfigError(f"{source}: [node] role = {node.role!r} shares the work with other processes: it needs "
                          "a PostgreSQL database_url (SQLite serves one process, role \"all\")")


def load_settings(path: str | Path | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> Settings:
    """Read settings from a TOML file (optional), then apply ``{section: {key: value}}`` overrides.

    Raises ConfigError (a ValueError) naming the file or "command line" and the key for an unknown key, a wrong
    type or an out-of-range value.
    """
    settings = Settings()
    sections = {f.name for f in dataclasses.fields(settings)}
    sources: list[tuple[str, dict[str, Any]]] = []
    if path is not None:
        with open(path, "rb") as fh:
            try:
                sources.append((f"config file {path}", tomllib.load(fh)))
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"config file {path}: not valid TOML: {exc}") from None
    sources.append(("command line", overrides or {}))
    for source, data in sources:
        for name, values in data.items():
            if name not in sections:
                raise ConfigError(f"{source}: unknown settings section [{name}] (known: {', '.join(sorted(sections))})")
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: {name} must be a [{name}] section, not a value")
            _merge(getattr(settings, name), {k: v for k, v in values.items() if v is not None}, name, source)
        _check_together(settings, source)
    return settings
