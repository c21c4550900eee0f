"""Deterministic UIDs for the node's outputs.

An output's UID depends only on the source series, the algorithm version and the output's role, so a re-run of
the same version on the same series produces the same UIDs and replaces (rather than duplicates) the objects at
the PACS. The UIDs are 2.25 UIDs (PS3.5 B.2) of name-based (SHA-1, RFC 4122 version 5) UUIDs.
"""

from __future__ import annotations

import uuid

# Namespace of the node's output UIDs, so another tool hashing the same inputs never collides with us.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:lpm-node:output-uid:v1")


def derive_uid(source_series_uid: str, algorithm_version: str, role: str) -> str:
    """Return a DICOM UID (2.25.<int>) derived from the source series UID, algorithm version and role.

    Same inputs give the same UID; any difference in one of them gives a different UID.
    """
    if not source_series_uid or not role:
        raise ValueError("source_series_uid and role must not be empty")
    name = "\x1f".join((str(source_series_uid).strip(), str(algorithm_version), role))
    return f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"
