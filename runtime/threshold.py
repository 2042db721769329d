"""Image scores and labels without ground truth: RsCIN in raw units and an outlier threshold.

RsCIN min-max normalises each batch, so its [0, 1] scores cannot be compared across batches
and always put some image at 1. Mapping the result back through the same min-max gives the
RsCIN-weighted average of the raw scores: the same ranking within the batch, in units
(patch distances) that one threshold can be held to over a whole shift.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import median

import torch

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation
OUTLIER_Z = 3.5  # Iglewicz & Hoaglin's cut-off for the modified z-score
MIN_SCORES = 5  # fewer scores than this give no usable median and MAD
AUTO_RULE = f"median + {OUTLIER_Z} * {MAD_TO_SIGMA} * MAD of the batch's scores"


def in_raw_units(rscin_scores: torch.Tensor, raw_scores: torch.Tensor) -> torch.Tensor:
    """RsCIN's [0, 1] scores mapped back through the min-max of the raw scores they came from."""
    low, high = raw_scores.min(), raw_scores.max()
    return low + rscin_scores * (high - low)


def auto_threshold(scores: Sequence[float]) -> float | None:
    """A score above which an image is an outlier of its own batch, or None for < 5 scores.

    Modified z-score rule: threshold = median + 3.5 * 1.4826 * MAD. It assumes most parts in
    the batch are good; on a batch that is mostly defective it flags too little.
    """
    if len(scores) < MIN_SCORES:
        return None
    middle = median(scores)
    mad = median(abs(score - middle) for score in scores)
    return float(middle + OUTLIER_Z * MAD_TO_SIGMA * mad)


def pick_threshold(fixed: float | None, scores: Sequence[float]) -> float | None:
    """The user's fixed threshold, or with none the automatic one for these scores."""
    return fixed if fixed is not None else auto_threshold(scores)


def label(score: float, threshold: float | None) -> str | None:
    """"anomalous" above the threshold, "normal" at or below it, None without a threshold."""
    if threshold is None:
        return None
    return "anomalous" if score > threshold else "normal"
