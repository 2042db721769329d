"""What a calibrated line judged alone gets for its time: recall, false rejects and time per
part against the bank's size (the coreset fraction), the similarity precision and the input
size (one package per size), on a labelled test split with known-good parts to teach.

Each part is timed as the line answers it on arrival: the backbone on that one image, then
the scorer's own stages (`scoring.known_good_maps`). The calibration is made exactly as
`musc-edge calibrate` makes it, from the first `parts` images of the good folder, which never
appear among the scored ones.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from musc_edge.bench.datasets import Sample
from musc_edge.bench.metrics import image_metrics
from musc_edge.calibration import BANK_PATCHES, Calibration, calibrate
from musc_edge.features import Features, extract_features
from musc_edge.images import read_image
from musc_edge.musc import MuSc
from musc_edge.package import ModelPackage
from musc_edge.precision import Precision
from musc_edge.profile import Profile
from musc_edge.runtime.known_good import KnownGood
from musc_edge.runtime.runners import Runner
from musc_edge.runtime.scoring import known_good_maps


@dataclass
class BankRow:
    """One (package, coreset, precision) arm: its verdicts at the calibration's threshold,
    and the median milliseconds per part of the backbone and of the scorer."""

    image_size: str
    coreset: float
    precision: str
    bank_patches: int
    recall: float  # % of the defective parts above the threshold
    false_rejects: int
    good: int
    defective: int
    auroc: float
    features_ms: float
    score_ms: float

    @property
    def ratio(self) -> float:
        return self.score_ms / self.features_ms

    def to_json(self) -> dict:
        return {**asdict(self), "score_per_feature": self.ratio}


@dataclass
class TestFeatures:
    """The scored parts' backbone outputs, labels, and each part's backbone time alone."""

    tokens: list[torch.Tensor]  # (N, L, C) per layer
    labels: np.ndarray  # (N,) 1: defective
    features_ms: list[float]


def test_features(package: ModelPackage, runner: Runner, samples: Sequence[Sample]) -> TestFeatures:
    """Each test image read, preprocessed and run through the backbone on its own."""
    preprocess = package.preprocessing()
    per_part: list[list[torch.Tensor]] = []
    times = []
    for sample in samples:
        image = preprocess(read_image(sample.path))[None]
        started = time.perf_counter()
        tokens, _ = runner(image)
        times.append(1000 * (time.perf_counter() - started))
        per_part.append([layer.float().cpu() for layer in tokens])
    tokens = [torch.cat(layer) for layer in zip(*per_part, strict=True)]
    return TestFeatures(tokens, np.array([s.label for s in samples]), times)


def teach(
    package: ModelPackage, musc: MuSc, good: Features, coreset: float, bank_patches: int
) -> Calibration:
    """A calibration as `musc-edge calibrate --coreset --bank-size` makes it."""
    files = [path.name for path in good.paths]
    return calibrate(
        package, musc, good.tokens, good.embeddings, files, bank_patches=bank_patches,
        coreset=coreset,
    )  # fmt: skip


def judge(
    tests: TestFeatures, musc: MuSc, calibration: Calibration
) -> tuple[np.ndarray, list[float]]:
    """Every test part's score, judged alone against the calibration, and its scoring ms."""
    known_good = KnownGood(calibration, 0, musc.precision.dtype)
    scores, times = [], []
    for index in range(len(tests.labels)):
        tokens = [layer[index : index + 1] for layer in tests.tokens]
        started = time.perf_counter()
        _, maps = known_good_maps(tokens, musc, known_good, Profile())
        times.append(1000 * (time.perf_counter() - started))
        scores.append(float(maps.amax()))
    return np.array(scores), times


def bank_rows(
    package: ModelPackage,
    runner: Runner,
    good_paths: Sequence[Path],
    samples: Sequence[Sample],
    coresets: Sequence[float],
    precisions: Sequence[Precision],
    bank_patches: int = BANK_PATCHES,
    on_row: Callable[[BankRow], None] = lambda row: None,
) -> list[BankRow]:
    """Every (coreset, precision) arm on one package; `on_row` as each is measured."""
    good = extract_features(good_paths, package.preprocessing(), runner, package.max_batch)
    tests = test_features(package, runner, samples)
    features_ms = statistics.median(tests.features_ms)
    size = str(package.preprocessing().image_size)
    rows = []
    for coreset in coresets:
        calibration = teach(package, MuSc.for_package(package), good, coreset, bank_patches)
        for precision in precisions:
            scores, times = judge(tests, MuSc.for_package(package, precision), calibration)
            flagged = scores > calibration.threshold
            labels = tests.labels.astype(bool)
            row = BankRow(
                size,
                coreset,
                precision.value,
                calibration.summary()["bank_patches"],
                100 * float(flagged[labels].mean()),
                int(flagged[~labels].sum()),
                int((~labels).sum()),
                int(labels.sum()),
                image_metrics(tests.labels, scores)["auroc"],
                features_ms,
                statistics.median(times),
            )
            on_row(row)
            rows.append(row)
    return rows
