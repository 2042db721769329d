"""Image- and pixel-level anomaly-detection metrics, defined as the MuSc paper reports them.

Curves come from scikit-learn and connected regions from scikit-image; results are in
percent except `pro_score`, which returns the fraction the paper's PRO definition yields.
PRO is computed from per-threshold histograms instead of re-thresholding every map, so a
full category (about a hundred 224x224 maps, 200 thresholds) takes well under a second.
"""

from __future__ import annotations

import numpy as np
from skimage.measure import label as label_regions
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score


def _check_binary(truth: np.ndarray, what: str) -> np.ndarray:
    """Truth values as bool, refusing a single class since AUROC is then undefined."""
    values = np.unique(truth)
    if not np.isin(values, (0, 1)).all():
        raise ValueError(f"{what} must be 0/1 or bool, got values {values[:5].tolist()}")
    if values.size < 2:
        raise ValueError(
            f"{what} are all {'anomalous' if values[0] else 'normal'}: AUROC needs both classes"
        )
    return truth.astype(bool)


def _check_scores(scores: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(scores).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    return scores.astype(np.float64, copy=False)


def _check_shapes(truth: np.ndarray, scores: np.ndarray, ndim: int, names: str) -> None:
    if truth.ndim != ndim or truth.shape != scores.shape:
        raise ValueError(
            f"{names} must both have {ndim} dimension(s) and the same shape, "
            f"got {truth.shape} and {scores.shape}"
        )


def f1_max(truth: np.ndarray, scores: np.ndarray) -> float:
    """Best F1 over all thresholds, as a fraction; points with P + R = 0 count as F1 = 0."""
    precision, recall, _ = precision_recall_curve(truth, scores)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)
    return float(f1.max())


def _percent_metrics(truth: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    return {
        "auroc": 100.0 * float(roc_auc_score(truth, scores)),
        "f1_max": 100.0 * f1_max(truth, scores),
        "ap": 100.0 * float(average_precision_score(truth, scores)),
    }


def image_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """AUROC, F1-max and AP of image scores against 0/1 labels, in percent."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    _check_shapes(labels, scores, 1, "labels and scores")
    return _percent_metrics(_check_binary(labels, "labels"), _check_scores(scores, "scores"))


def pixel_metrics(masks: np.ndarray, maps: np.ndarray) -> dict[str, float]:
    """AUROC, F1-max, AP and PRO of (N, H, W) anomaly maps against masks, in percent."""
    masks, maps = np.asarray(masks), np.asarray(maps)
    _check_shapes(masks, maps, 3, "masks and maps")
    truth = _check_binary(masks, "masks")
    values = _check_scores(maps, "maps")
    metrics = _percent_metrics(truth.ravel(), values.ravel())
    metrics["pro"] = 100.0 * pro_score(truth, values)
    return metrics


def _region_ids(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected ground-truth regions numbered 1..R across all images, 0 outside them."""
    ids = np.zeros(masks.shape, dtype=np.int64)
    count = 0
    for index, mask in enumerate(masks):
        regions, found = label_regions(mask, return_num=True)
        ids[index] = np.where(regions > 0, regions + count, 0)
        count += found
    return ids, count


def _counts_above(
    bins: np.ndarray, groups: np.ndarray, num_groups: int, num_thresholds: int
) -> np.ndarray:
    """(groups, thresholds) counts of pixels scoring above each threshold.

    `bins` holds, per pixel, how many thresholds lie strictly below its score, so a pixel
    exceeds threshold t exactly when its bin is greater than t.
    """
    width = num_thresholds + 1
    hist = np.bincount(groups * width + bins, minlength=num_groups * width)
    at_or_above = np.cumsum(hist.reshape(num_groups, width)[:, ::-1], axis=1)[:, ::-1]
    return at_or_above[:, 1:]


def _normalised_auc(fprs: np.ndarray, pros: np.ndarray) -> float:
    """Area under PRO(FPR) with the FPR axis stretched to [0, 1].

    A curve whose FPRs do not vary is a single operating point: its best PRO is returned.
    """
    span = fprs.max() - fprs.min()
    if span == 0:
        return float(pros.max())
    return float(auc((fprs - fprs.min()) / span, pros))


def pro_score(
    masks: np.ndarray, maps: np.ndarray, num_thresholds: int = 200, fpr_limit: float = 0.3
) -> float:
    """Normalised area under the per-region-overlap curve up to `fpr_limit`, as a fraction.

    Thresholds step evenly from the maps' minimum towards their maximum; at each, PRO is
    the mean over connected ground-truth regions of the share of their pixels above it and
    FPR the share of normal pixels above it. Points under `fpr_limit` are kept and their
    FPRs min-max scaled to [0, 1] before integrating, as in the MuSc code.
    """
    masks, maps = np.asarray(masks), np.asarray(maps)
    _check_shapes(masks, maps, 3, "masks and maps")
    truth = _check_binary(masks, "masks")
    values = _check_scores(maps, "maps")
    if num_thresholds < 1:
        raise ValueError(f"num_thresholds must be at least 1, got {num_thresholds}")

    thresholds = np.linspace(values.min(), values.max(), num_thresholds, endpoint=False)
    bins = np.searchsorted(thresholds, values, side="left")
    ids, num_regions = _region_ids(truth)

    region_hits = _counts_above(bins.ravel(), ids.ravel(), num_regions + 1, num_thresholds)
    region_sizes = np.bincount(ids.ravel(), minlength=num_regions + 1)
    pros = (region_hits[1:] / region_sizes[1:, None]).mean(axis=0)
    fprs = region_hits[0] / region_sizes[0]

    kept = fprs < fpr_limit
    if not kept.any():
        return 0.0
    return _normalised_auc(fprs[kept], pros[kept])
