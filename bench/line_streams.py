"""Verdicts measured as a line sees them: build a stream, run the real `Line` over it, count.

Every figure comes from the records the line wrote (results.jsonl), joined with the stream's
truth by file name: recall (defective parts labelled anomalous), false-reject rate (good parts
labelled anomalous), the pooled image AUROC of `score` over all batches, and the flags.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from musc_edge.bench.datasets import load_samples
from musc_edge.bench.metrics import image_metrics
from musc_edge.bench.streams import (
    Part,
    brightness_ramp,
    labelled_split,
    repeated_fault,
    write_stream,
)
from musc_edge.calibration import load_calibration
from musc_edge.errors import UsageError
from musc_edge.images import list_images
from musc_edge.musc import MuSc
from musc_edge.package import ModelPackage
from musc_edge.runtime.backends import LocalBackend
from musc_edge.runtime.inspections import margin
from musc_edge.runtime.line import Line
from musc_edge.runtime.runners import Runner
from musc_edge.runtime.settings import LineSettings, settings_problem
from musc_edge.runtime.verdicts import ANOMALOUS


@dataclass(frozen=True)
class StreamSource:
    """Where streams are built from: a labelled test split and a folder of good parts."""

    dataset_root: Path
    category: str
    calibrations: tuple[Path, ...] = ()  # their parts are never put into a stream

    def test_samples(self):
        return load_samples("mvtec", self.dataset_root, self.category)

    def good_folder(self) -> Path:
        return self.dataset_root / self.category / "train" / "good"

    def unused_good(self) -> list[Path]:
        """The category's train/good images no calibration used."""
        used = {
            Path(name).name for path in self.calibrations for name in load_calibration(path).files
        }
        return [path for path in list_images(self.good_folder()) if path.name not in used]


def defects_first(source: StreamSource) -> list[Part]:
    """Grouped by defect type with the good parts last: a line that starts with a fault."""
    parts = labelled_split(source.test_samples(), "grouped")
    return [p for p in parts if p.label] + [p for p in parts if not p.label]


def drifting(source: StreamSource) -> list[Part]:
    """The mixed stream under light that dims to 75 % over the stream."""
    return brightness_ramp(mixed(source), end=0.75)


def mixed(source: StreamSource) -> list[Part]:
    """Unused good parts with the test split's defects spread evenly among them."""
    good = good_parts(source.unused_good())
    defects = [p for p in labelled_split(source.test_samples(), "shuffled", seed=1) if p.label]
    parts, step = [], max(1, len(good) // max(1, len(defects)))
    for index, part in enumerate(good):
        parts.append(part)
        if index % step == step - 1 and defects:
            parts.append(defects.pop())
    parts += defects
    return [replace(p, name=f"{i:04d}_{p.name[5:]}") for i, p in enumerate(parts)]


def good_parts(paths: list[Path]) -> list[Part]:
    return [Part(f"{i:04d}_good_{p.name}", 0, "good", p) for i, p in enumerate(paths)]


def repeated(source: StreamSource) -> list[Part]:
    """80 unused good parts: the same piece at the same place on 20, four one-off pieces. The
    pieces are cut from the folder's first image, which is never one of the 80."""
    donor = list_images(source.good_folder())[0]
    good = [path for path in source.unused_good() if path != donor][:80]
    if len(good) < 80:
        raise UsageError(f"the repeated-fault stream needs 80 unused good parts, {len(good)} here")
    return repeated_fault(good, donor=donor, faulty=20, one_off=4)


STREAMS: dict[str, Callable[[StreamSource], list[Part]]] = {
    "grouped": lambda source: labelled_split(source.test_samples(), "grouped"),
    "shuffled": lambda source: labelled_split(source.test_samples(), "shuffled"),
    "defects-first": defects_first,
    "repeated": repeated,
    "mixed": mixed,
    "drift": drifting,
}


def ranking_score(record) -> float:
    """What parts are ranked by: the score, or with several inspection items (each in its own
    units) the largest of their scores over their thresholds."""
    if not record.items:
        return record.score
    return max(margin(item) for item in record.items)


def stream_report(parts: list[Part], records: list) -> dict:
    """Recall, false-reject rate, AUROC of `score` and flags, from the line's records."""
    truth = {part.name: part for part in parts}
    scored = [r for r in records if r.error is None and r.file in truth]
    labels = [truth[r.file].label for r in scored]
    flagged = [r.label == ANOMALOUS for r in scored]
    defective = [f for f, lab in zip(flagged, labels, strict=True) if lab]
    good = [f for f, lab in zip(flagged, labels, strict=True) if not lab]
    report = {
        "parts": len(scored),
        "defective": len(defective),
        "recall": 100 * sum(defective) / len(defective) if defective else None,
        "false_rejects": sum(good),
        "good": len(good),
        "frr": 100 * sum(good) / len(good) if good else None,
        "auroc": image_metrics(labels, [ranking_score(r) for r in scored])["auroc"]
        if 0 < sum(labels) < len(labels)
        else None,
        "auroc_mutual": mutual_auroc(labels, scored),
        "uncalibrated_records": sum(not r.calibrated for r in scored),
        "shift_records": sum(r.shift for r in scored),
        "repeated_flags": sum(r.repeated for r in scored),
        "joined_references": sum(r.joined_references for r in scored),
        **timing_report(scored),
        "by_kind": {},
    }
    for kind in sorted({truth[r.file].kind for r in scored}):
        of_kind = [r for r in scored if truth[r.file].kind == kind]
        kind_labels = [truth[r.file].label for r in scored if truth[r.file].kind in (kind, "good")]
        kind_scores = [r.score for r in scored if truth[r.file].kind in (kind, "good")]
        report["by_kind"][kind] = {
            "parts": len(of_kind),
            "anomalous": sum(r.label == ANOMALOUS for r in of_kind),
            "repeated_flags": sum(r.repeated for r in of_kind),
            "auroc_vs_good": image_metrics(kind_labels, kind_scores)["auroc"]
            if kind != "good" and 0 < sum(kind_labels) < len(kind_labels)
            else None,
        }
    return report


def mutual_auroc(labels: list[int], records: list) -> float | None:
    """The AUROC of the mutual score alone (`raw_score`), where the line computed one: what
    `--mutual` knows of the parts besides their distance to the known-good ones."""
    if any(r.raw_score is None for r in records) or not 0 < sum(labels) < len(labels):
        return None
    return image_metrics(labels, [r.raw_score for r in records])["auroc"]


def timing_report(records: list) -> dict:
    """What the records' own timings say: features and scoring summed (a commit's scoring
    counted once, however many parts it answered), their ratio, and the p95 latency from a
    part's file ready to its answer committed."""
    features = sum(r.timings.features_ms or 0.0 for r in records)
    commits = {r.commit: r.timings.score_ms or 0.0 for r in records}
    latencies = [r.timings.latency_ms for r in records if r.timings.latency_ms is not None]
    return {
        "features_ms_total": features,
        "score_ms_total": sum(commits.values()),
        "score_per_feature": sum(commits.values()) / features if features else None,
        "latency_p95_ms": float(np.percentile(latencies, 95)) if latencies else None,
    }


def line_settings_of(camera: Path, out: Path, settings: dict) -> LineSettings:
    """The line's settings for one stream, or a one-line UsageError naming the bad option."""
    try:
        return LineSettings(camera, out, watch=False, settle=0.0, poll=0.05, **settings)
    except ValidationError as error:
        raise UsageError(
            settings_problem(error, lambda key: "--" + key.replace("_", "-"))
        ) from None


def run_stream(
    parts: list[Part],
    package: ModelPackage,
    runner: Runner,
    musc: MuSc,
    settings: dict,
    work: Path | None = None,
) -> dict:
    """Write the stream into a camera folder, run the line once over it, report."""
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        camera, out = Path(scratch) / "camera", Path(scratch) / "results"
        write_stream(parts, camera)
        line_settings = line_settings_of(camera, out, settings)
        started = time.perf_counter()
        line = Line(line_settings, LocalBackend(package, runner, musc))
        line.run()
        seconds = time.perf_counter() - started
        report = stream_report(parts, list(line.journal.records()))
    return {**report, "seconds": seconds, "ms_per_part": 1000 * seconds / max(1, len(parts))}
