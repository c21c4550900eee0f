"""Reading an attribute of one frame from the functional groups of an enhanced (multi-frame) dataset."""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset


def functional_group_value(ds: Dataset, frame: int, sequence: str, keyword: str) -> Any:
    """``keyword`` from the ``sequence`` item of ``frame``'s functional groups, or None.

    The per-frame group of ``frame`` (0-based) is read first, then the shared group (PS3.3 C.7.6.16: an
    attribute is in one or the other). A group item that lacks the keyword does not hide the other group.
    """
    for groups_keyword, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(groups_keyword)
        if groups is None or len(groups) <= index:
            continue
        items = groups[index].get(sequence)
        if items is not None and len(items) > 0 and keyword in items[0]:
            return items[0].get(keyword)
    return None
