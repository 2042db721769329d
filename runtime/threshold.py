"""Labels without ground truth: a threshold on MuSc's scores, fixed or from the batch itself.

MuSc's image score is RsCIN's: raw scores min-max normalised over the batch (rolling: the
window), then smoothed, so it lies in [0, 1] and says how an image stands among its peers.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import median

import torch

from musc_edge.musc import RELIABLE_BATCH

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation
OUTLIER_Z = 3.5  # Iglewicz & Hoaglin's cut-off for the modified z-score
AUTO_RULE = f"median + {OUTLIER_Z} * {MAD_TO_SIGMA} * MAD of the batch's scores"


def pixel_threshold(threshold: float | None, raw_scores: torch.Tensor) -> float | None:
    """The threshold in patch-distance units, for masks: the same min-max that turned the raw
    scores into scores, undone, so an image's mask is empty exactly when its normalised raw
    score is at or below the threshold.
    """
    if threshold is None:
        return None
    low, high = float(raw_scores.min()), float(raw_scores.max())
    return low + threshold * (high - low)


def auto_threshold(scores: Sequence[float]) -> float | None:
    """A score above which an image is an outlier of its own batch, or None for < 5 scores.

    Modified z-score rule: threshold = median + 3.5 * 1.4826 * MAD. It assumes most parts in
    the batch are good; on a batch that is mostly defective it flags too little.
    """
    if len(scores) < RELIABLE_BATCH:
        return None
    middle = median(scores)
    mad = median(abs(score - middle) for score in scores)
    return float(middle + OUTLIER_Z * MAD_TO_SIGMA * mad)


def pick_threshold(fixed: float | None, scores: Sequence[float]) -> float | None:
    """The user's fixed threshold, or with none the automatic one for these scores."""
    return fixed if fixed is not None else auto_threshold(scores)


def label(score: float, threshold: float | None) -> str | None:
    """ "anomalous" above the threshold, "normal" at or below it, None without a threshold."""
    if threshold is None:
        return None
    return "anomalous" if score > threshold else "normal"
