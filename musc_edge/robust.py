"""Robust statistics of scores: the median and a spread that a few outliers cannot move."""

from __future__ import annotations

from collections.abc import Sequence
from statistics import median

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation
OUTLIER_Z = 3.5  # Iglewicz & Hoaglin's cut-off for the modified z-score
MIN_SCORES = 5  # fewer scores say nothing about their spread


def robust_band(scores: Sequence[float]) -> tuple[float, float]:
    """(median, standard deviation estimated from the MAD) of the scores."""
    middle = median(scores)
    return middle, MAD_TO_SIGMA * median(abs(s - middle) for s in scores)


def outlier_threshold(scores: Sequence[float]) -> float | None:
    """median + 3.5 sigma of the scores (the modified z-score rule), None for under 5 scores.
    It assumes most of the scores are of good parts."""
    if len(scores) < MIN_SCORES:
        return None
    centre, spread = robust_band(scores)
    return centre + OUTLIER_Z * spread
