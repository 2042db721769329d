"""Inspection items: what the line judges in each image, and how several verdicts become one.

A line judges the whole image, the one box of `--region`, or several named items (`items:` in
the line config, `--item` on the command line): a cap, a label and a fill level seen by one
camera. Each item has its own box, its own known-good parts (`musc-edge calibrate --region`
with that box), its own threshold and threshold history, and its own verdict; each is scored
against the same item of the other parts, never against another item. The image's record
carries every item's verdict and takes its own from the worst one, so a line acts on one label
per part and still sees which item failed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from musc_edge.calibration import load_calibration
from musc_edge.package import ModelPackage
from musc_edge.region import Region
from musc_edge.runtime.known_good import KnownGood
from musc_edge.runtime.record import ItemResult, ResultRecord
from musc_edge.runtime.scoring import Answer
from musc_edge.runtime.settings import LineSettings
from musc_edge.runtime.verdicts import ANOMALOUS, NORMAL, UNJUDGED, Verdict, Verdicts

# which verdict is worse: a part is as bad as its worst item
SEVERITY = {ANOMALOUS: 3, UNJUDGED: 2, NORMAL: 1, None: 0}


@dataclass
class Inspection:
    """One item of the image: its box (None: the whole image), known-good parts and judge."""

    name: str | None  # None: the line's only inspection (records without `items`)
    region: Region | None
    calibration: Path | None
    known_good: KnownGood | None
    verdicts: Verdicts

    def cut(self, image: np.ndarray) -> np.ndarray:
        """The item's pixels (RegionOutsideImage when the image does not hold its box)."""
        return image if self.region is None else self.region.crop(image)


def inspections_of(
    settings: LineSettings,
    package: ModelPackage,
    dtype: torch.dtype,
    history: Callable[[], Iterable[ResultRecord]],
) -> list[Inspection]:
    """The line's items in the order of its settings, each with its calibration checked
    against the package and its box, and its threshold history rebuilt from the journal
    (`history()` reads it afresh for each item, streaming: it can be long)."""
    if not settings.items:
        region = None if settings.region is None else Region(*settings.region)
        return [
            inspection(
                None, region, settings.calibration, settings.threshold, settings, package,
                dtype, history(),
            )
        ]  # fmt: skip
    return [
        inspection(
            name,
            Region(*item.region),
            item.calibration,
            item.threshold,
            settings,
            package,
            dtype,
            (
                result
                for record in history()
                for result in record.items or ()
                if result.name == name
            ),
        )
        for name, item in settings.items.items()
    ]


def inspection(
    name: str | None,
    region: Region | None,
    calibration_path: Path | None,
    threshold: float | None,
    settings: LineSettings,
    package: ModelPackage,
    dtype: torch.dtype,
    history: Iterable[ResultRecord | ItemResult],
) -> Inspection:
    known_good = None
    if calibration_path is not None:
        calibration = load_calibration(calibration_path, package)
        calibration.check_region(region, calibration_path)
        mutual = not settings.judged_alone
        known_good = KnownGood(calibration, settings.refresh_references, dtype, mutual)
    verdicts = Verdicts.for_line(threshold, known_good, history, settings.batch_size)
    return Inspection(name, region, calibration_path, known_good, verdicts)


def margin(result: ItemResult) -> float:
    """An item's score over its own threshold (1.0: at the threshold), so items whose scores
    are in different units compare; the plain score while there is no threshold."""
    return result.score if not result.threshold else result.score / result.threshold


def severity(result: ItemResult) -> tuple[int, float]:
    """How bad an item's verdict is: its label first, then its margin."""
    return SEVERITY[result.label], margin(result)


def item_result(inspection: Inspection, answer: Answer, verdict: Verdict) -> ItemResult:
    """One item's part of a record: its scores and its verdict."""
    return ItemResult(
        inspection.name or "",
        None if inspection.region is None else inspection.region.to_json(),
        answer.score,
        answer.raw_score,
        answer.reference_score,
        verdict.label,
        verdict.threshold,
        verdict.basis,
        verdict.calibrated,
        verdict.shift,
        verdict.repeated,
        verdict.joined,
    )


def worst(results: Sequence[ItemResult]) -> int:
    """The index of the item the image's verdict is taken from."""
    return max(range(len(results)), key=lambda index: severity(results[index]))
