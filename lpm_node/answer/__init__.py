"""DICOM writers: the SEG, the TID 1500 SR and the key image the node answers the PACS with.

All three reference the source series in its study, with UIDs derived from the source series and the algorithm
version (``derive_uid``), so a re-run replaces rather than duplicates.
"""

from lpm_node.answer.frames import nearest_source_slice, write_dataset
from lpm_node.answer.keyimage import build_key_image
from lpm_node.answer.seg import build_seg, segment_number
from lpm_node.answer.sr import build_sr
from lpm_node.answer.uids import derive_uid

__all__ = [
    "build_key_image",
    "build_seg",
    "build_sr",
    "derive_uid",
    "nearest_source_slice",
    "segment_number",
    "write_dataset",
]
