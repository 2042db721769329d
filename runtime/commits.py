"""A commit: the records of one scored group (or of files that failed), through every sink.

The line hands its answers and verdicts here; this module numbers the batch, assembles each
`ResultRecord` (scores, verdict, output paths, timings; or the error and the rejected copy)
and passes the commit to the sinks in their crash-safe order (`runtime/sinks/__init__.py`),
timing each sink into the run's profile (stage "sink NAME").
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from musc_edge.profile import Profile
from musc_edge.runtime.camera import Arrival
from musc_edge.runtime.inspections import Inspection, item_result, worst
from musc_edge.runtime.journal import Journal
from musc_edge.runtime.outputs import set_aside, visual_paths
from musc_edge.runtime.record import ResultRecord, Timings
from musc_edge.runtime.schedulers import Scheduler
from musc_edge.runtime.scoring import PartAnswers
from musc_edge.runtime.sinks import CommitContext, Sink
from musc_edge.runtime.verdicts import Verdict


class Committer:
    """Builds a commit's records and hands them to the sinks, in order."""

    def __init__(
        self,
        out_dir: Path,
        journal: Journal,
        sinks: dict[str, Sink],
        scheduler: Scheduler,
        inspections: Sequence[Inspection],
        mode: str,
        model_sha256: str,
        profile: Profile,
    ) -> None:
        self.out_dir = out_dir
        self.inspections = inspections
        self.journal = journal
        self.sinks = sinks  # by name, in the order they are called
        self.profile = profile
        self.scheduler = scheduler
        self.mode = mode
        self.model_sha256 = model_sha256

    def answers(
        self,
        parts: Sequence[PartAnswers],
        verdicts: Sequence[Sequence[Verdict]],
        scoring: Profile,
    ) -> tuple[list[ResultRecord], float]:
        """Commit scored images (each part's answers and verdicts, one per inspection item);
        returns their records and the batch latency (ms: the last image ready -> committed)."""
        batch = self.scheduler.batch_number(self.journal)
        now = time.monotonic()
        records = [
            self.scored(answers, part_verdicts, batch, now, scoring)
            for answers, part_verdicts in zip(parts, verdicts, strict=True)
        ]
        batch_ms = (now - max(answers[0].item.arrival.ready_at for answers in parts)) * 1000
        answers_by_file = {answers[0].item.arrival.file: answers for answers in parts}
        self._commit(records, CommitContext(batch, answers_by_file, batch_ms))
        return records, batch_ms

    def failures(self, arrivals: Sequence[Arrival]) -> list[ResultRecord]:
        """Commit files that could not be scored, each with a copy in rejected/ if allowed."""
        batch = self.scheduler.batch_number(self.journal)
        records = [
            self.record(
                arrival,
                batch,
                error=arrival.error,
                rejected=set_aside(self.out_dir, arrival.path, arrival.file, arrival.sha256)
                if arrival.copyable
                else None,
            )
            for arrival in arrivals
        ]
        self._commit(records, CommitContext(batch))
        return records

    def scored(
        self,
        answers: PartAnswers,
        verdicts: Sequence[Verdict],
        batch: int,
        now: float,
        scoring: Profile,
    ) -> ResultRecord:
        """A part's record: its worst item's verdict, and every item's when there are several."""
        results = [
            item_result(inspection, answer, verdict)
            for inspection, answer, verdict in zip(self.inspections, answers, verdicts, strict=True)
        ]
        index = worst(results)
        result, verdict, item = results[index], verdicts[index], answers[index].item
        overlay, mask = visual_paths(batch, item.arrival.file, result.threshold is not None)
        latency = (now - item.arrival.ready_at) * 1000
        warnings = dict.fromkeys(answer.warning for answer in answers)  # the same per item
        notes = (item.arrival.note, *warnings, verdict.why)
        named = self.inspections[0].name is not None
        return self.record(
            item.arrival,
            batch,
            score=result.score,
            raw_score=result.raw_score,
            reference_score=result.reference_score,
            label=result.label,
            threshold=result.threshold,
            threshold_basis=result.threshold_basis,
            calibrated=all(r.calibrated for r in results),
            shift=any(r.shift for r in results),
            repeated=any(r.repeated for r in results),
            joined_references=result.joined_references,
            items=results if named else None,
            item=result.name if named else None,
            overlay=overlay,
            mask=mask,
            warning="; ".join(filter(None, notes)) or None,
            timings=Timings(
                round(item.features_ms, 2),
                round(scoring.ms["score"], 2),
                round(latency, 2),
                {name: ms for name, ms in scoring.rounded().items() if name != "score"},
            ),
        )

    def record(self, arrival: Arrival, batch: int, **fields) -> ResultRecord:
        return ResultRecord(
            *arrival.key,
            arrival.sha256,
            batch,
            self.mode,
            model_sha256=self.model_sha256,
            **fields,
        )

    def _commit(self, records: list[ResultRecord], context: CommitContext) -> None:
        for name, sink in self.sinks.items():
            with self.profile.stage(f"sink {name}"):
                sink.commit(records, context)
