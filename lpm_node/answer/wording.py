"""How values are worded: HU with as many decimals as keep them on their side of the threshold."""

from __future__ import annotations


def honest_decimals(value: float, threshold: float, decimals: int = 1, most: int = 6) -> int:
    """The fewest decimals, at least ``decimals``, at which ``value`` rounded stays on its side of ``threshold``.

    39.96 against 40 needs 2 decimals ("39.96"), since "40.0" would read as equal to the threshold.
    """
    below = value < threshold
    for places in range(decimals, most + 1):
        shown = round(value, places)
        if (shown < threshold) == below:
            return places
    return most


def hu_text(value: float, threshold: float) -> str:
    """``value`` in HU as text with :func:`honest_decimals` places (never reads as the wrong side of the
    threshold)."""
    return f"{value:.{honest_decimals(value, threshold)}f}"


def honest_round(value: float, threshold: float, decimals: int = 2) -> float:
    """``value`` rounded to at least ``decimals`` places, more where fewer would cross ``threshold``."""
    return round(float(value), honest_decimals(float(value), threshold, decimals))
