"""Deterministic UIDs for the node's outputs, from the identity of their content.

An output's UID depends on everything that decides its content: the source series and which of its instances were
measured (their SOP Instance UIDs and checksums), the software version, the model's identity (name, version,
weights checksum) and the settings that change the result (threshold, QC thresholds, SEG frame omission, ...),
plus the output's role. The same inputs give the same UIDs, so a re-send
replaces rather than duplicates; any change gives new UIDs (PS3.5 9: one UID, one content). The UIDs are 2.25
UIDs (PS3.5 B.2) of name-based (SHA-1, RFC 4122 version 5) UUIDs.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import lpm_node
from lpm_node.imaging.model_identity import ModelIdentity

# Namespace of the node's output UIDs, so another tool hashing the same inputs never collides with us.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:lpm-node:output-uid:v1")

# One UID for the node as an SR observer device (PS3.16 TID 1004): the same in every report it writes.
DEVICE_OBSERVER_UID = f"2.25.{uuid.uuid5(_NAMESPACE, 'device-observer').int}"


def derive_uid(source_series_uid: str, content: str, role: str) -> str:
    """Return a DICOM UID (2.25.<int>) derived from the source series UID, a content key and the role.

    ``content`` is the rest of the content identity (for example :meth:`ContentIdentity.key`, or a bare
    software version). Same inputs give the same UID; any difference in one of them gives a different UID.
    """
    if not source_series_uid or not role:
        raise ValueError("source_series_uid and role must not be empty")
    name = "\x1f".join((str(source_series_uid).strip(), str(content), role))
    return f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"


def instances_digest(instances: Iterable[tuple[str, str]]) -> str:
    """SHA-256 (hex) of the measured source instances: their (SOP Instance UID, file checksum) pairs, in any order."""
    digest = hashlib.sha256()
    for uid, checksum in sorted((str(u).strip(), str(c)) for u, c in instances):
        digest.update(f"{uid}\x1f{checksum}\x1e".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class ContentIdentity:
    """What an answer's content depends on; its UIDs are derived from it.

    ``instances`` is the :func:`instances_digest` of the measured source instances ("" when not known);
    ``settings`` holds the settings that change the result, flattened to ``"section.name" -> value``.
    """

    source_series_uid: str
    software_version: str = lpm_node.__version__
    model: ModelIdentity | None = None
    settings: Mapping[str, object] = field(default_factory=dict)
    instances: str = ""

    def key(self) -> str:
        """Canonical text of everything but the source series (sorted JSON)."""
        model = self.model.as_dict() if self.model is not None else None
        body: dict[str, object] = {"software_version": self.software_version, "model": model,
                                   "settings": dict(self.settings)}
        if self.instances:
            body["instances"] = self.instances
        return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)

    def uid(self, role: str) -> str:
        """The UID of one output role (e.g. "sr-instance") for this content."""
        return derive_uid(self.source_series_uid, self.key(), role)


def identity_for(source_series_uid: str, algorithm_version: str, identity: ContentIdentity | None) -> ContentIdentity:
    """``identity`` when given (checked to name the same series), else one from the series and version alone."""
    if identity is None:
        return ContentIdentity(source_series_uid, algorithm_version)
    if identity.source_series_uid != source_series_uid:
        raise ValueError("the content identity names another source series")
    return identity
