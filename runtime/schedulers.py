"""When the line scores: a scheduler per `--mode`, behind one interface.

The line's loop takes files, extracts their features and hands the parts to its scheduler (a
part: one item per inspection item of the image, `runtime/inspections.py`, scored each against
the same item of the other parts and answered together);
the scheduler says how many files to take next (`room`), which answers are ready to commit
(those `add` yields at once, then `ready`, in commit order), whether it still holds anything
(`busy`), and which batch number the next commit gets. Batch and rolling mode differ only
here.

- `BatchScheduler`: every `batch_size` items are scored together; a partial batch when the run
  ends or its oldest item has waited `max_wait` (below 5 parts with the previous batch as
  references, `scoring.score_batch`). With
  `overlap`, a batch is scored in a worker thread while the loop extracts the next items.
- `RollingScheduler`: each item is answered on arrival against the window of the last
  answered ones (`scoring.RollingScorer`).
- `AloneScheduler`: a calibrated line that judges by its known-good parts alone (no
  `--mutual`), in either mode: each part is answered on arrival, by itself
  (`scoring.score_known_good`); nothing is held, so no batch or warm-up is waited for.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from functools import partial

import torch

from musc_edge.musc import MuSc
from musc_edge.profile import Profile
from musc_edge.runtime.journal import Journal
from musc_edge.runtime.known_good import KnownGood, judges_alone
from musc_edge.runtime.scoring import (
    Part,
    PartAnswers,
    RollingScorer,
    Window,
    per_part,
    score_batch,
    score_known_good,
)

Scored = tuple[list[PartAnswers], Profile]  # answers per part and the stage times


def profiled(score: Callable[[Profile], list[PartAnswers]]) -> Scored:
    """`score(profile)`'s answers and its stage times, the whole call as "score" (in
    whichever thread it runs)."""
    profile = Profile()
    with profile.stage("score"):
        answers = score(profile)
    return answers, profile


class Scheduler:
    """Holds extracted items until they are scored; see the module docstring."""

    def __init__(
        self,
        musc: MuSc,
        batch_size: int,
        map_norm: str,
        known_good: list[KnownGood | None],
        max_batch: int,
        max_wait: float | None,
    ) -> None:
        self.musc = musc
        self.batch_size = batch_size
        self.map_norm = map_norm
        self.known_good = known_good  # per inspection item
        self.max_batch = max_batch
        self.max_wait = max_wait  # None: no time limit (the run ends with --once)

    def room(self) -> int:
        """How many files to take now."""
        raise NotImplementedError

    def add(self, parts: list[Part]) -> Iterator[Scored]:
        """Take parts whose features are extracted, in arrival order; yields the answers
        they make possible at once (each to be committed before the next is scored)."""
        raise NotImplementedError

    def ready(self, finishing: bool) -> tuple[list[Scored], bool]:
        """Answers to commit now, in order, and whether scoring started that will answer
        later (the loop then goes on at once); `finishing`: score whatever is held."""
        raise NotImplementedError

    @property
    def held(self) -> int:
        """Items waiting to be scored."""
        raise NotImplementedError

    @property
    def busy(self) -> bool:
        """Items held or being scored."""
        return self.held > 0

    @property
    def overlaps(self) -> bool:
        """Whether a batch is scored while the loop extracts the next items."""
        return False

    @property
    def problem(self) -> str | None:
        """Why parts cannot be scored now (a scoring service that does not answer), or None."""
        return None

    def batch_number(self, journal: Journal) -> int:
        """The batch the next commit belongs to (failures: the one being collected)."""
        raise NotImplementedError

    def wait(self, stop: threading.Event, poll: float) -> None:
        """Until the next poll."""
        stop.wait(poll)

    def close(self) -> None:
        """Stop any worker (after the answers in flight are collected)."""

    def waited_too_long(self, since: float | None) -> bool:
        """An item ready at `since` (monotonic) has waited `max_wait` for its answer."""
        if since is None or self.max_wait is None:
            return False
        return time.monotonic() - since >= self.max_wait


class BatchScheduler(Scheduler):
    def __init__(self, *args, overlap: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.in_hand: list[Part] = []
        self.recent_parts = self.windows()
        # with overlap one batch is scored in this thread while the loop extracts the next
        self.worker = ThreadPoolExecutor(1, "musc-score") if overlap else None
        self.scoring: Future[Scored] | None = None  # the batch in flight

    def windows(self) -> list[Window]:
        """The last batch, per item: the references of a partial batch (the tail of a run)."""
        return [Window(self.batch_size, self.musc.precision.dtype) for _ in self.known_good]

    def room(self) -> int:
        room = self.batch_size - len(self.in_hand)
        # without overlap a full batch is scored before the next take, so take at least one
        return min(self.max_batch, room if self.worker is not None else max(1, room))

    def add(self, parts: list[Part]) -> Iterator[Scored]:
        self.in_hand.extend(parts)
        yield from ()

    def ready(self, finishing: bool) -> tuple[list[Scored], bool]:
        done: list[Scored] = []
        if self.scoring is not None and self.scoring.done():
            future, self.scoring = self.scoring, None
            done.extend(self._collect(future))
        if self.scoring is not None or not self._due(finishing):
            return done, False
        parts, self.in_hand = self.in_hand[: self.batch_size], self.in_hand[self.batch_size :]
        score = partial(self._score, parts)
        if self.worker is None:
            done.append(profiled(score))
            return done, False
        self.scoring = self.worker.submit(profiled, score)
        return done, True

    def _collect(self, future: Future[Scored]) -> list[Scored]:
        """The worker's answers to commit (its errors are raised here)."""
        return [future.result()]

    def _score(self, parts: list[Part], profile: Profile) -> list[PartAnswers]:
        """Each inspection item of the parts scored as one batch."""
        return per_part(
            [
                score_batch(
                    [part[index] for part in parts],
                    self.musc,
                    self.map_norm,
                    known,
                    recent,
                    profile,
                )
                for index, (known, recent) in enumerate(
                    zip(self.known_good, self.recent_parts, strict=True)
                )
            ]
        )

    def _due(self, finishing: bool) -> bool:
        if not self.in_hand:
            return False
        if len(self.in_hand) >= self.batch_size or finishing:
            return True
        return self.waited_too_long(self.in_hand[0][0].arrival.ready_at)

    @property
    def held(self) -> int:
        return len(self.in_hand)

    @property
    def busy(self) -> bool:
        return bool(self.in_hand) or self.scoring is not None

    @property
    def overlaps(self) -> bool:
        return self.worker is not None

    def batch_number(self, journal: Journal) -> int:
        records = journal.last_batch_records
        if records and all(r.error for r in records):
            return journal.last_batch  # errors recorded while this batch was being collected
        return journal.last_batch + 1

    def wait(self, stop: threading.Event, poll: float) -> None:
        """Until the next poll, or sooner when the batch in flight is scored."""
        if self.scoring is None:
            stop.wait(poll)
        else:
            wait_for([self.scoring], timeout=poll)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.shutdown(wait=True)


class OnArrivalScheduler(Scheduler):
    """Answers each part as it is added (`_answer`); groups of `batch_size` answers share a
    batch number (and a manifest)."""

    def room(self) -> int:
        return self.max_batch

    def add(self, parts: list[Part]) -> Iterator[Scored]:
        for part in parts:
            yield profiled(partial(self._answer, part))

    def _answer(self, part: Part, profile: Profile) -> list[PartAnswers]:
        raise NotImplementedError

    def batch_number(self, journal: Journal) -> int:
        records = journal.last_batch_records
        if 0 < len(records) < self.batch_size:
            return journal.last_batch
        return journal.last_batch + 1


class RollingScheduler(OnArrivalScheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scorers = [
            RollingScorer(self.musc, self.batch_size, self.map_norm, known)
            for known in self.known_good
        ]  # one per inspection item, all in the same state: they see the same parts

    def _answer(self, part: Part, profile: Profile) -> list[PartAnswers]:
        return per_part(
            [scorer.add(item, profile) for scorer, item in zip(self.scorers, part, strict=True)]
        )

    def _flush(self, profile: Profile) -> list[PartAnswers]:
        return per_part([scorer.flush(profile) for scorer in self.scorers])

    def ready(self, finishing: bool) -> tuple[list[Scored], bool]:
        """The warm-up group, when the run ends or it has waited `max_wait`."""
        if finishing or self.waited_too_long(self.scorers[0].waiting_since):
            return [profiled(self._flush)], False
        return [], False

    @property
    def held(self) -> int:
        return len(self.scorers[0].waiting)


class AloneScheduler(OnArrivalScheduler):
    """Each part answered on arrival by its known-good parts alone (module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not all(judges_alone(known) for known in self.known_good):
            raise ValueError("AloneScheduler needs every item's known-good parts, judging alone")
        for known in self.known_good:
            self._warm_up(known)

    def _warm_up(self, known: KnownGood) -> None:
        """Pool and measure one random image of the calibration's shape, so the first part's
        answer does not carry the pooling op's one-time set-up (about 2 s on a CPU)."""
        _, patches, width = known.calibration.sets[0].shape
        layers = len(known.calibration.sets) // len(self.musc.r_list)
        references = known.references()
        image = torch.randn(1, patches, width, device=references.sets[0].device)
        self.musc.bank_maps(self.musc.pool([image] * layers), references)

    def _answer(self, part: Part, profile: Profile) -> list[PartAnswers]:
        return per_part(
            [
                score_known_good([item], self.musc, self.map_norm, known, profile)
                for known, item in zip(self.known_good, part, strict=True)
            ]
        )

    def ready(self, finishing: bool) -> tuple[list[Scored], bool]:
        return [], False  # nothing is ever held

    @property
    def held(self) -> int:
        return 0


# one scheduler per --mode (runtime/settings.py: Mode), and the one a calibration judging alone
# uses in either mode (`scheduler_name`)
SCHEDULERS: dict[str, type[Scheduler]] = {
    "batch": BatchScheduler,
    "rolling": RollingScheduler,
    "alone": AloneScheduler,
}


def scheduler_name(mode: str, known_good: list[KnownGood | None]) -> str:
    """`alone` when every item is judged by known-good parts alone, else the mode's."""
    if all(judges_alone(known) for known in known_good):
        return "alone"
    return mode
