"""DICOM writers: the SEG, the TID 1500 SR, the key image and the Key Object Selection the node answers with.

The node calls one entry, :mod:`lpm_node.answer.build`. All objects reference the source series in its study,
with UIDs derived from the identity of their content (``ContentIdentity``: source series and measured instances,
software version, model, result-changing settings), so a re-run replaces rather than duplicates and a different
result never reuses a UID.
"""

from lpm_node.answer.build import build_answer, write_answer, write_dataset
from lpm_node.answer.keyimage import build_key_image
from lpm_node.answer.kos import build_kos
from lpm_node.answer.seg import build_seg, segment_number
from lpm_node.answer.source import nearest_source_slice
from lpm_node.answer.sr import build_sr
from lpm_node.answer.uids import ContentIdentity, derive_uid

__all__ = [
    "ContentIdentity",
    "build_answer",
    "build_key_image",
    "build_kos",
    "build_seg",
    "build_sr",
    "derive_uid",
    "nearest_source_slice",
    "segment_number",
    "write_answer",
    "write_dataset",
]
