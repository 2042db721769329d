"""Verdicts: how a commit's answers become labels, thresholds and flags, in one place.

`Verdicts` is what the line asks: it holds the judge (who sets the threshold), the recent
scores the shift is measured on, the unjudged rule and the known-good references a clearly
normal part may join, and it describes itself for the start-up message.

Scores are in patch-distance units whatever the batch (docs/verdicts.md), so a threshold can
outlive a batch. It comes from one of three places, each a `Judge`:

- a calibration (`--calibration`): the known-good parts' threshold for the target false-reject
  rate, fixed for the run;
- the line's history (no calibration): a robust outlier rule over the scores of the parts this
  line has answered normal, rebuilt from the journal at every start, so a burst of bad parts
  cannot raise it and a restart keeps it; every record says it is uncalibrated;
- the user (`--threshold X`).

A commit whose median score lies outside the judge's normal band is flagged as a shift: more
than half of the parts look unlike the normal ones (a fault burst, a new product, lighting).

A part is never passed without a judgement: without a calibration its score means something
only when it was compared with at least RELIABLE_BATCH - 1 other parts; below that (a batch of
one at the end of a run with no earlier parts in memory) it is labelled "unjudged".
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from statistics import median
from typing import TYPE_CHECKING

from musc_edge.calibration import Calibration
from musc_edge.musc import RELIABLE_BATCH
from musc_edge.robust import OUTLIER_Z, outlier_threshold, robust_band
from musc_edge.runtime.known_good import Joined, KnownGood
from musc_edge.runtime.record import ResultRecord

if TYPE_CHECKING:
    from musc_edge.runtime.scoring import Answer

HISTORY_MIN = 2 * RELIABLE_BATCH  # normal parts before the history alone sets the threshold
HISTORY_SIZE = 2000  # normal scores kept: the last shift or so, so the rule follows slow drift
ANOMALOUS, NORMAL, UNJUDGED = "anomalous", "normal", "unjudged"


def label(score: float, threshold: float | None) -> str | None:
    """ "anomalous" above the threshold, "normal" at or below it, None without a threshold."""
    if threshold is None:
        return None
    return ANOMALOUS if score > threshold else NORMAL


def judgeable(compared: int, calibrated: bool) -> bool:
    """Whether a score can be judged: the known-good parts judge any part; a mutual score
    needs enough other parts to have been compared with."""
    return calibrated or compared >= RELIABLE_BATCH - 1


def verdict_of(
    score: float, threshold: float | None, compared: int, calibrated: bool
) -> tuple[str | None, str | None]:
    """The label of one answer, and why it is unjudged when it is."""
    if judgeable(compared, calibrated):
        return label(score, threshold), None
    return UNJUDGED, (
        f"unjudged: compared with {compared} other part(s) and no calibration; "
        "calibrate the line (musc-edge calibrate) to judge every part"
    )


class Judge:
    """The threshold for a commit's scores and the normal band a shift is measured against."""

    basis = "none"
    calibrated = False
    parts = 0  # known-good parts behind the threshold
    frr_upper_bound: float | None = None  # how sure it is (musc_edge/calibration.py)

    def threshold(self, scores: Sequence[float]) -> float | None:
        raise NotImplementedError

    def band(self) -> tuple[float, float] | None:
        """(centre, spread) of normal scores, or None while nothing is known."""
        return None

    def observe(self, scores: Sequence[float], labels: Sequence[str | None]) -> None:
        """Learn from a committed group of answers (the history judge keeps the normal ones)."""

    def shifted(self, scores: Sequence[float], threshold: float | None) -> bool:
        """True when the median of `scores` is above the threshold or far below normal."""
        band = self.band()
        if band is None or threshold is None or not scores:
            return False
        centre, spread = band
        middle = median(scores)
        return middle > threshold or middle < centre - OUTLIER_Z * spread


class FixedJudge(Judge):
    """The user's threshold; nothing to learn, no normal band."""

    basis = "fixed"

    def __init__(self, value: float) -> None:
        self.value = value

    def threshold(self, scores: Sequence[float]) -> float | None:
        return self.value


class CalibratedJudge(Judge):
    """The calibration's threshold and the band of its known-good parts' scores; `told` is
    what the start-up message says of it. Built from the numbers alone too: a station of a
    scoring service (`remote.py`) judges with the service's calibration without holding it."""

    basis = "calibration"
    calibrated = True

    def __init__(
        self,
        threshold: float,
        centre: float,
        spread: float,
        told: str,
        parts: int,
        frr_upper_bound: float | None,
    ) -> None:
        self.value, self.centre, self.spread, self.told = threshold, centre, spread, told
        self.parts, self.frr_upper_bound = parts, frr_upper_bound

    @classmethod
    def of(cls, calibration: Calibration) -> CalibratedJudge:
        centre, spread = robust_band(calibration.scores.tolist())
        bound = calibration.summary()["frr_upper_bound"]
        told = calibrated_message(calibration)
        return cls(calibration.threshold, centre, spread, told, len(calibration), bound)

    def to_json(self) -> dict[str, float | str | int | None]:
        return {
            "threshold": self.value,
            "centre": self.centre,
            "spread": self.spread,
            "told": self.told,
            "parts": self.parts,
            "frr_upper_bound": self.frr_upper_bound,
        }

    def threshold(self, scores: Sequence[float]) -> float | None:
        return self.value

    def band(self) -> tuple[float, float]:
        return self.centre, self.spread


class HistoryJudge(Judge):
    """Median + 3.5 sigma (from the MAD) of the scores this line has answered normal."""

    basis = "history"

    def __init__(self, records: Iterable[ResultRecord] = ()) -> None:
        self.normal: deque[float] = deque(maxlen=HISTORY_SIZE)
        # scores answered before any threshold existed (rolling mode's first parts): they
        # help the first threshold form, so a line never stays unlabelled for good
        self.unjudged: deque[float] = deque(maxlen=HISTORY_MIN)
        for record in records:
            if record.threshold_basis == self.basis and record.score is not None:
                self._keep(record.score, record.label)

    def threshold(self, scores: Sequence[float]) -> float | None:
        """From the history; until it holds 10 normal parts, the rule over history, the
        unjudged first parts and the commit in hand."""
        known = list(self.normal)
        if len(known) < HISTORY_MIN:
            return outlier_threshold([*known, *self.unjudged, *scores])
        return outlier_threshold(known)

    def band(self) -> tuple[float, float] | None:
        return robust_band(self.normal) if len(self.normal) >= RELIABLE_BATCH else None

    def observe(self, scores: Sequence[float], labels: Sequence[str | None]) -> None:
        for score, verdict in zip(scores, labels, strict=True):
            self._keep(score, verdict)

    def _keep(self, score: float, verdict: str | None) -> None:
        if verdict == NORMAL:
            self.normal.append(score)
        elif verdict is None:
            self.unjudged.append(score)


def calibrated_message(calibration: Calibration) -> str:
    """How sure a calibration's threshold is, for the start-up message."""
    summary = calibration.summary()
    return (
        f"calibrated: {len(calibration)} known-good parts, threshold "
        f"{calibration.threshold:.4f} ({100 * calibration.target_frr:g} % false "
        f"rejects expected; shown by the parts: below "
        f"{100 * summary['frr_upper_bound']:.1f} % at {100 * summary['confidence']:g} %"
        f" confidence, {summary['parts_for_target']} parts would show the target)"
    )


@dataclass
class Verdict:
    """What the line says of one scored part besides its scores."""

    label: str | None
    threshold: float | None
    basis: str  # "calibration", "history" or "fixed"
    calibrated: bool
    shift: bool  # the commit's scores left the normal band
    repeated: bool  # the guard saw a defect repeating at one place (scoring.py)
    joined: bool  # joined the known-good references (--refresh-references)
    why: str | None = None  # why the part is unjudged


class Verdicts:
    """Turns each commit's answers into verdicts, and learns from them."""

    def __init__(self, judge: Judge, window: int, known_good: KnownGood | None = None) -> None:
        self.judge = judge
        self.known_good = known_good
        self.recent: deque[float] = deque(maxlen=window)  # the scores the shift is taken on

    @classmethod
    def for_line(
        cls,
        threshold: float | None,
        known_good: KnownGood | None,
        history: Iterable[ResultRecord],
        window: int,
    ) -> Verdicts:
        """The user's threshold, else the calibration's, else one from the line's history."""
        if threshold is not None:
            judge: Judge = FixedJudge(threshold)
        elif known_good is not None:
            judge = CalibratedJudge.of(known_good.calibration)
        else:
            judge = HistoryJudge(history)
        return cls(judge, window, known_good)

    @property
    def basis(self) -> str:
        return self.judge.basis

    @property
    def calibrated(self) -> bool:
        return self.judge.calibrated

    def describe(self) -> str:
        """Where the threshold comes from, for the start-up message (uncalibrated loudly)."""
        if isinstance(self.judge, CalibratedJudge):
            return self.judge.told
        if isinstance(self.judge, FixedJudge):
            return f"threshold {self.judge.value} (fixed by --threshold; not calibrated)"
        return (
            "UNCALIBRATED: the threshold comes from this line's own history; run "
            "`musc-edge calibrate` with known-good parts for verdicts you can trust"
        )

    def decide(self, answers: Sequence[Answer]) -> list[Verdict]:
        """One verdict per answer of a commit; the judge and the references learn from them."""
        calibrated = self.calibrated
        scores = [a.score for a in answers if judgeable(a.compared, calibrated)]
        threshold = self.judge.threshold(scores)
        self.recent.extend(scores)
        shift = self.judge.shifted(list(self.recent), threshold)
        verdicts = []
        for answer in answers:
            label_, why = verdict_of(answer.score, threshold, answer.compared, calibrated)
            joined = self._offer(answer, label_)
            verdicts.append(
                Verdict(
                    label_, threshold, self.basis, calibrated, shift, answer.repeated, joined, why
                )
            )
        self.judge.observe([a.score for a in answers], [v.label for v in verdicts])
        return verdicts

    def _offer(self, answer: Answer, verdict: str | None) -> bool:
        """--refresh-references: a clearly normal part may join the known-good references
        (nothing is gathered for the offer when refreshing is off)."""
        if self.known_good is None or not self.known_good.refresh or verdict != NORMAL:
            return False
        item = answer.item
        raw = math.nan if answer.raw_score is None else answer.raw_score
        joined = Joined(item.arrival.file, answer.sets, item.embedding, raw)
        return self.known_good.offer(joined, answer.score)
