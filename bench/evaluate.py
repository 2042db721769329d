"""Evaluation on labelled test sets: score each category as one MuSc batch, then measure.

Zero-shot by default, as the paper; with K known-good references (few-shot, `--shots`, or a
line's calibration) the scores and maps are each patch's distance to them, as a calibrated
line judges; with the calibration's threshold, the verdicts at it are reported too.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from musc_edge.bench.datasets import Sample
from musc_edge.bench.metrics import image_metrics, pixel_metrics
from musc_edge.features import Extractor, Features, extract_features
from musc_edge.images import Preprocess, read_image, read_mask
from musc_edge.musc import Hooks, MuSc, References
from musc_edge.visualize import normalise_maps, overlay, write_png

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class CategoryReport:
    """Metrics (percent), per-image scores and failures of one category."""

    category: str
    image: dict[str, float]
    pixel: dict[str, float] | None  # None when some anomalous image has no mask
    pixel_mutual: dict[str, float] | None  # few-shot: of the mutual maps, the bank's above
    images: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    shots: int = 0  # known-good references it was scored with (0: zero-shot)
    at_threshold: dict[str, float] | None = None  # verdicts at a calibration's threshold


def evaluate_category(
    category: str,
    samples: list[Sample],
    preprocess: Preprocess,
    extractor: Extractor,
    musc: MuSc,
    progress: Progress | None = None,
    maps_dir: Path | None = None,
    references: References | None = None,
    threshold: float | None = None,
) -> CategoryReport:
    """Extract features, score the category's images against each other (and against known-good
    `references`, whose distance then makes the scores and maps), compute metrics; with a
    `threshold`, also the recall and false-reject rate of the verdicts at it."""
    started = time.perf_counter()
    report = progress or (lambda stage, done, total: None)
    done = 0

    def on_batch(count: int) -> None:
        nonlocal done
        done += count
        report("features", done, len(samples))

    features = extract_features([s.path for s in samples], preprocess, extractor, on_batch=on_batch)
    scoring = Hooks(progress=lambda done, total: report("scoring", done, total))
    result = musc.score(features.tokens, features.embeddings, hooks=scoring, known_good=references)
    by_path = {s.path: s for s in samples}
    scored = [by_path[p] for p in features.paths]
    labels = np.array([s.label for s in scored])
    scores = result.verdict_scores.numpy()
    maps = result.pixel_maps(preprocess.image_size.hw).numpy()
    pixel = pixel_mutual = None
    if all(s.mask_path is not None for s in scored if s.label == 1):
        masks = np.stack(
            [
                read_mask(s.mask_path, preprocess.image_size)
                if s.mask_path
                else np.zeros(maps.shape[1:], bool)
                for s in scored
            ]
        )
        pixel = pixel_metrics(masks, maps)
        if result.bank_maps is not None:  # the mutual maps, for comparison (docs/verdicts.md)
            mutual = result.pixel_maps(preprocess.image_size.hw, mutual=True).numpy()
            pixel_mutual = pixel_metrics(masks, mutual)
    if maps_dir is not None:
        save_maps(maps_dir / category, scored, maps)
    images = [
        {
            "file": str(s.path),
            "label": s.label,
            "defect": s.defect,
            "score": float(score),
            "raw_score": float(raw),
        }
        for s, score, raw in zip(scored, scores, result.raw_scores.numpy(), strict=True)
    ]
    failures = [{"file": str(f.path), "error": f.error} for f in features.failures]
    return CategoryReport(
        category,
        image_metrics(labels, scores),
        pixel,
        pixel_mutual,
        images,
        failures,
        time.perf_counter() - started,
        at_threshold=None if threshold is None else verdicts_at(labels, scores, threshold),
    )


def verdicts_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Recall and false-reject rate (percent) of `score > threshold`, as the line labels."""
    anomalous = scores > threshold
    defective, good = labels == 1, labels == 0
    return {
        "threshold": float(threshold),
        "recall": float(100 * anomalous[defective].mean()) if defective.any() else float("nan"),
        "false_reject_rate": float(100 * anomalous[good].mean()) if good.any() else float("nan"),
    }


def known_good(musc: MuSc, features: Features) -> References:
    """Known-good images as MuSc references; with one image its mutual score is simply 0."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a bank of 1 to 4 images is small by design
        raw = musc.score(features.tokens, features.embeddings).raw_scores
    return References(musc.pool(features.tokens), features.embeddings, raw)


def save_maps(folder: Path, samples: list[Sample], maps: np.ndarray) -> None:
    """Overlay PNGs (maps normalised over the category) as folder/defect/name.png."""
    for sample, heat in zip(samples, normalise_maps(maps, "batch"), strict=True):
        write_png(
            folder / sample.defect / f"{sample.path.stem}.png",
            overlay(read_image(sample.path), heat),
        )


def mean_metrics(reports: list[CategoryReport]) -> dict[str, float]:
    """Category means of each metric, as the paper's tables report them."""
    rows = [
        {
            **{f"image_{k}": v for k, v in r.image.items()},
            **{f"pixel_{k}": v for k, v in (r.pixel or {}).items()},
        }
        for r in reports
    ]
    keys = sorted({key for row in rows for key in row})
    return {key: float(np.mean([row[key] for row in rows if key in row])) for key in keys}
