"""Metrics on cases small enough to check by hand, and PRO against its literal definition."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest
from skimage.measure import label, regionprops
from sklearn.metrics import auc

from musc_edge.bench.metrics import image_metrics, pixel_metrics, pro_score


def square_masks(num_images: int = 6, size: int = 32) -> np.ndarray:
    """Every other image holds one or two square defects."""
    masks = np.zeros((num_images, size, size), dtype=bool)
    for index in range(0, num_images, 2):
        masks[index, 4:12, 4:12] = True
        masks[index, 20 - index : 26 - index, 18:28] = True
    return masks


def literal_pro(masks: np.ndarray, maps: np.ndarray, steps: int, limit: float = 0.3) -> float:
    """PRO spelled out threshold by threshold, region by region, as the paper describes it."""
    pros, fprs = [], []
    for threshold in np.linspace(maps.min(), maps.max(), steps, endpoint=False):
        binary = maps > threshold
        overlaps = [
            binary[i][r.coords[:, 0], r.coords[:, 1]].mean()
            for i, mask in enumerate(masks)
            for r in regionprops(label(mask))
        ]
        pros.append(np.mean(overlaps))
        fprs.append((binary & ~masks).sum() / (~masks).sum())
    pros_kept, fprs_kept = np.array(pros), np.array(fprs)
    kept = fprs_kept < limit
    x = fprs_kept[kept]
    return float(auc((x - x.min()) / (x.max() - x.min()), pros_kept[kept]))


def test_image_metrics_perfect_separation() -> None:
    metrics = image_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9]))
    assert metrics == pytest.approx({"auroc": 100.0, "f1_max": 100.0, "ap": 100.0})


def test_image_metrics_reversed_scores() -> None:
    metrics = image_metrics(np.array([0, 0, 1, 1]), np.array([0.9, 0.8, 0.2, 0.1]))
    assert metrics["auroc"] == pytest.approx(0.0)


def test_image_metrics_known_case() -> None:
    # Top-down: pos, neg, pos, neg. Best cut keeps three images: P = 2/3, R = 1, F1 = 0.8.
    # AUROC: 3 of 4 positive-negative pairs ordered right. AP: 0.5 * 1 + 0.5 * 2/3.
    metrics = image_metrics(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.1]))
    assert metrics == pytest.approx({"auroc": 75.0, "f1_max": 80.0, "ap": 250 / 3})


@pytest.mark.filterwarnings("error")
def test_f1_max_guards_zero_precision_and_recall() -> None:
    # The top threshold admits only the negative: P = R = 0 there, which must not divide by 0.
    metrics = image_metrics(np.array([0, 1]), np.array([0.9, 0.1]))
    assert metrics["f1_max"] == pytest.approx(200 / 3)


def test_image_metrics_accept_bool_labels() -> None:
    metrics = image_metrics(np.array([False, True]), np.array([0.0, 1.0]))
    assert metrics["auroc"] == pytest.approx(100.0)


def test_pro_perfect_map_is_one() -> None:
    masks = square_masks()
    noise = np.random.default_rng(0).random(masks.shape) * 0.01
    assert pro_score(masks, masks + noise) == pytest.approx(1.0, abs=0.01)
    assert pro_score(masks, masks.astype(np.float32)) == pytest.approx(1.0)


def test_pro_map_independent_of_mask_is_low() -> None:
    masks = square_masks()
    maps = np.random.default_rng(1).random(masks.shape)
    assert pro_score(masks, maps) < 0.2


def test_pro_inverted_map_is_zero() -> None:
    # Every threshold flags all normal pixels (FPR = 1), so no point stays under the limit.
    masks = square_masks()
    assert pro_score(masks, (~masks).astype(np.float32)) == 0.0


def test_pro_matches_literal_definition() -> None:
    rng = np.random.default_rng(2)
    masks = square_masks()
    maps = masks * rng.random(masks.shape) + 0.7 * rng.random(masks.shape)
    assert pro_score(masks, maps, num_thresholds=40) == pytest.approx(
        literal_pro(masks, maps, steps=40), abs=1e-9
    )


def test_pro_is_fast_on_a_category() -> None:
    rng = np.random.default_rng(3)
    masks = np.zeros((83, 224, 224), dtype=bool)
    masks[::2, 50:90, 60:100] = True
    masks[1::3, 150:170, 10:30] = True
    maps = rng.random(masks.shape, dtype=np.float32)
    start = time.perf_counter()
    pro_score(masks, maps)
    assert time.perf_counter() - start < 10.0


def test_pixel_metrics_single_square() -> None:
    # Half of a 4x4 defect scores 1, everything else 0, in 2 images of 16x16 (512 pixels).
    masks = np.zeros((2, 16, 16), dtype=bool)
    masks[0, 4:8, 4:8] = True
    maps = np.zeros(masks.shape, dtype=np.float32)
    maps[0, 4:8, 4:6] = 1.0
    metrics = pixel_metrics(masks, maps)
    assert metrics == pytest.approx(
        {
            "auroc": 75.0,  # half the defect wins, half ties with every normal pixel
            "f1_max": 200 / 3,  # P = 1, R = 1/2
            "ap": 100 * (0.5 + 0.5 * 16 / 512),
            "pro": 50.0,  # one region, half covered, at every threshold
        }
    )


def test_pixel_metrics_perfect_map() -> None:
    masks = square_masks()
    metrics = pixel_metrics(masks, masks.astype(np.float32))
    assert metrics == pytest.approx({"auroc": 100.0, "f1_max": 100.0, "ap": 100.0, "pro": 100.0})


@pytest.mark.parametrize("labels", [np.zeros(4), np.ones(4)])
def test_single_class_labels_rejected(labels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="both classes"):
        image_metrics(labels, np.arange(4.0))


def test_masks_without_defects_rejected() -> None:
    masks = np.zeros((2, 8, 8), dtype=bool)
    with pytest.raises(ValueError, match="both classes"):
        pixel_metrics(masks, np.zeros(masks.shape))
    with pytest.raises(ValueError, match="both classes"):
        pro_score(masks, np.zeros(masks.shape))


def test_non_binary_labels_rejected() -> None:
    with pytest.raises(ValueError, match="0/1"):
        image_metrics(np.array([0, 1, 2]), np.arange(3.0))


def test_non_finite_scores_rejected() -> None:
    with pytest.raises(ValueError, match="NaN"):
        image_metrics(np.array([0, 1]), np.array([0.0, np.nan]))


@pytest.mark.parametrize(
    ("call", "truth", "scores"),
    [
        (image_metrics, np.array([0, 1, 1]), np.array([0.1, 0.9])),
        (image_metrics, np.array([[0, 1]]), np.array([[0.1, 0.9]])),
        (pixel_metrics, square_masks(2, 8), np.zeros((2, 8, 9))),
        (pixel_metrics, square_masks(2, 8)[0], np.zeros((8, 8))),
        (pro_score, square_masks(2, 8), np.zeros((3, 8, 8))),
    ],
)
def test_shape_mismatch_rejected(
    call: Callable[[np.ndarray, np.ndarray], object], truth: np.ndarray, scores: np.ndarray
) -> None:
    with pytest.raises(ValueError, match="same shape"):
        call(truth, scores)
