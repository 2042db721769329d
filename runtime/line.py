"""The camera-folder line: watch, extract on arrival, score in batches or rolling, commit.

Each commit (a scored batch, a rolling answer, a group of failures) is a list of result
records handed to the sinks in the crash-safe order `musc_edge.runtime.sinks` states. The
journal is the only state: whatever it lacks after a crash is scored again at the next start,
whatever it holds is never scored again.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from musc_edge.calibration import load_calibration
from musc_edge.errors import UsageError
from musc_edge.images import DEFAULT_MAX_PIXELS
from musc_edge.musc import MuSc
from musc_edge.package import ModelPackage
from musc_edge.parallel import usable_cores
from musc_edge.runtime.camera import Arrival, CameraDir
from musc_edge.runtime.health import LineHealth
from musc_edge.runtime.journal import Journal
from musc_edge.runtime.known_good import Joined, KnownGood
from musc_edge.runtime.lock import OutFolderLock
from musc_edge.runtime.outputs import preview, set_aside, visual_paths
from musc_edge.runtime.record import ResultRecord, Timings
from musc_edge.runtime.runners import Runner
from musc_edge.runtime.scoring import Answer, Item, RollingScorer, Window, score_batch
from musc_edge.runtime.sinks import CommitContext, Sink, SinkSetup, SinkSpecs, open_sinks
from musc_edge.runtime.verdicts import (
    ANOMALOUS,
    NORMAL,
    UNJUDGED,
    CalibratedJudge,
    FixedJudge,
    HistoryJudge,
    Judge,
    judgeable,
    verdict_of,
)

MODES = ("batch", "rolling")


@dataclass
class LineSettings:
    """How the line runs; every field is a `musc-edge run` option."""

    camera_dir: Path
    out_dir: Path
    batch_size: int = 32
    mode: str = "batch"
    watch: bool = True
    threshold: float | None = None  # None: the calibration's, or else the line's history
    calibration: Path | None = None  # known-good parts from `musc-edge calibrate`
    refresh_references: int = 0  # calibrated: up to this many recent clearly-normal parts join
    map_norm: str = "batch"
    poll: float = 0.5
    settle: float = 1.0
    decode_timeout: float = 10.0
    max_wait: float | None = 60.0  # watch, batch mode: score a partial batch this old
    sinks: SinkSpecs = field(default_factory=dict)  # extra sinks: name -> options, in order
    max_pixels: int = DEFAULT_MAX_PIXELS  # images declaring more are refused undecoded
    overlap: bool | None = None  # batch mode: extract the next images while one is scored
    ignore: tuple[str, ...] = ()  # glob patterns of camera paths never looked at (an archive)


def overlap_helps() -> bool:
    """Whether extracting the next images while a batch is scored pays here: with a GPU, or
    with more than one core (measured on two: 14 % less time per part, docs/benchmarks.md)."""
    return torch.cuda.is_available() or usable_cores() > 1


def timed(score: Callable[[], list[Answer]]) -> tuple[list[Answer], float]:
    """`score()`'s answers and the milliseconds it took (in whichever thread it runs)."""
    started = time.perf_counter()
    answers = score()
    return answers, (time.perf_counter() - started) * 1000


@dataclass
class LineStats:
    """What the terminal shows while the line runs."""

    seen: int = 0
    scored: int = 0
    failed: int = 0
    pending: int = 0
    batches: int = 0
    last_batch_ms: float | None = None  # batch mode: last image ready -> batch committed
    image_ms: deque[float] = field(default_factory=lambda: deque(maxlen=1000))  # recent, ms
    resumed: int = 0  # results already in the journal at start
    dropped: int = 0  # torn journal lines cut off at start (those images are scored again)
    anomalous: int = 0
    calibrated: bool = False  # False: thresholds from the line's own history
    shifts: int = 0  # commits whose scores left the normal band
    repeated: int = 0  # calibrated: anomalous parts that look ordinary among their peers
    joined: int = 0  # parts that joined the known-good references (--refresh-references)
    threshold: float | None = None  # the latest one
    unjudged: int = 0  # parts with nothing to compare with and no calibration
    problem: str | None = None  # why the camera folder cannot be watched now


class Line:
    """One run of the line over a camera folder into an output folder."""

    def __init__(
        self,
        settings: LineSettings,
        package: ModelPackage,
        runner: Runner,
        musc: MuSc,
        on_update: Callable[[LineStats], None] | None = None,
    ) -> None:
        if settings.mode not in MODES:
            raise UsageError(f"mode must be one of {', '.join(MODES)}, got {settings.mode!r}")
        if settings.batch_size < 1:
            raise UsageError(f"batch size must be at least 1, got {settings.batch_size}")
        if not settings.camera_dir.is_dir():
            raise UsageError(f"camera folder {settings.camera_dir} does not exist")
        if settings.out_dir.resolve() == settings.camera_dir.resolve():
            raise UsageError(
                f"--out {settings.out_dir} is the camera folder; the line would score its own "
                "outputs. Choose a folder beside it (the default is CAMERA_DIR-musc-results)"
            )
        self.lock = OutFolderLock(settings.out_dir)
        try:
            self._open(settings, package, runner, musc, on_update)
        except BaseException:
            self.lock.release()
            raise

    def _open(
        self,
        settings: LineSettings,
        package: ModelPackage,
        runner: Runner,
        musc: MuSc,
        on_update: Callable[[LineStats], None] | None,
    ) -> None:
        self.settings = settings
        self.package = package
        self.runner = runner
        self.musc = musc
        self.preprocess = package.preprocessing()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.on_update = on_update or (lambda stats: None)
        self.journal = Journal(settings.out_dir)
        self.model_sha256 = package.sha256
        refuse_other_model(self.journal, package)
        self.health = LineHealth(settings.out_dir)
        self.camera = CameraDir(
            settings.camera_dir,
            self.journal.keys,
            settings.settle,
            settings.decode_timeout,
            exclude=settings.out_dir,
            max_pixels=settings.max_pixels,
            answered_content=self.journal.contents,
            ignore=settings.ignore,
        )
        self.known_good = None
        if settings.calibration is not None:
            calibration = load_calibration(settings.calibration, package)
            self.known_good = KnownGood(
                calibration, settings.refresh_references, musc.precision.dtype
            )
        elif settings.refresh_references:
            raise UsageError("--refresh-references needs a --calibration to refresh")
        self.judge = self._judge(settings)
        self.recent: deque[float] = deque(maxlen=settings.batch_size)  # for the shift check
        self.stats = LineStats(
            resumed=len(self.journal.keys),
            dropped=self.journal.dropped_lines,
            calibrated=self.judge.calibrated,
        )
        self.rolling = (
            RollingScorer(musc, settings.batch_size, settings.map_norm, self.known_good)
            if settings.mode == "rolling"
            else None
        )
        self.in_hand: list[Item] = []
        # batch mode: the last batch, the references of a partial batch (the tail of a run)
        self.recent_parts = (
            Window(settings.batch_size, musc.precision.dtype) if self.rolling is None else None
        )
        overlap = overlap_helps() if settings.overlap is None else settings.overlap
        # batch mode with overlap: one batch is scored in this thread while the loop extracts
        self.scorer = (
            ThreadPoolExecutor(1, "musc-score") if overlap and settings.mode == "batch" else None
        )
        self.scoring: Future[tuple[list[Answer], float]] | None = None  # batch in flight
        self.run_info = {
            "mode": settings.mode,
            "camera_dir": str(settings.camera_dir),
            "model": str(package.folder),
            "model_sha256": self.model_sha256,
            "backbone": package.backbone,
            "image_size": package.image_size,
            "engine": runner.description,
            "msm_precision": musc.precision.value,
            "window": musc.window,  # positional MSM (docs/positional.md), None: global
            "musc": {"r_list": musc.r_list, "frac": musc.frac, "k_list": musc.k_list},
            "threshold_basis": self.judge.basis,
            "calibration": str(settings.calibration) if settings.calibration else None,
            "known_good_parts": len(self.known_good) if self.known_good else 0,
            "map_norm": settings.map_norm,
            "overlap": self.scorer is not None,
        }
        self.sinks: list[Sink] = open_sinks(
            SinkSetup(settings.out_dir, self.journal, self.run_info, health=self.health),
            settings.sinks,
        )

    def _judge(self, settings: LineSettings) -> Judge:
        """The user's threshold, else the calibration's, else one from the line's history."""
        if settings.threshold is not None:
            return FixedJudge(settings.threshold)
        if self.known_good is not None:
            return CalibratedJudge(self.known_good.calibration)
        return HistoryJudge(self.journal.records())

    def run(self, stop: threading.Event | None = None) -> LineStats:
        """Until stopped (watch) or until the folder is done (once); returns the totals."""
        try:
            return self._loop(stop or threading.Event())
        finally:
            if self.scorer is not None:
                self.scorer.shutdown(wait=True)
            for sink in self.sinks:
                sink.flush()
                sink.close()
            self.lock.release()

    def _loop(self, stop: threading.Event) -> LineStats:
        settings = self.settings
        while True:
            self.camera.scan()
            self.health.report("camera", self.camera.problem)
            self.stats.problem = self.camera.problem
            stopping = stop.is_set()
            worked = False
            if not stopping:
                arrivals = self.camera.take(self._room())
                worked = bool(arrivals)
                self._receive(arrivals)
            done = not settings.watch and self.camera.pending == 0
            if self.rolling is None:
                worked = self._collect_scored() or worked
                if self.scoring is None and self._batch_due(stopping or done):
                    self._score_batch()
                    worked = True
            elif stopping or done or self._waited_too_long(self.rolling.waiting_since):
                self._timed_commit(self.rolling.flush)
            self.stats.pending = self.camera.pending + len(self.in_hand)
            self.stats.seen = self.stats.resumed + self.camera.handed_out + self.camera.pending
            self.on_update(self.stats)
            if (stopping or done) and not self.in_hand and self.scoring is None:
                return self.stats
            if not worked:
                self._wait(stop)

    def _wait(self, stop: threading.Event) -> None:
        """Until the next poll, or sooner when the batch in flight is scored."""
        if self.scoring is None:
            stop.wait(self.settings.poll)
        else:
            wait_for([self.scoring], timeout=self.settings.poll)

    def _room(self) -> int:
        """How many files to take now: enough to fill the batch, in engine-sized chunks."""
        if self.rolling is not None:
            return self.package.max_batch
        room = self.settings.batch_size - len(self.in_hand)
        # without overlap a full batch is scored before the next take, so take at least one
        return min(self.package.max_batch, room if self.scorer is not None else max(1, room))

    def _batch_due(self, finishing: bool) -> bool:
        if not self.in_hand:
            return False
        if len(self.in_hand) >= self.settings.batch_size or finishing:
            return True
        return self._waited_too_long(self.in_hand[0].arrival.ready_at)

    def _waited_too_long(self, since: float | None) -> bool:
        """Watching: a part ready at `since` has waited --max-wait for its answer."""
        max_wait = self.settings.max_wait if self.settings.watch else None
        if since is None or max_wait is None:
            return False
        return time.monotonic() - since >= max_wait

    def _receive(self, arrivals: list[Arrival]) -> None:
        """Errors are recorded at once; images get their features now, not when scored."""
        failures = [a for a in arrivals if a.error is not None]
        if failures:
            self._commit_errors(failures)
        good = [a for a in arrivals if a.error is None]
        if not good:
            return
        started = time.perf_counter()
        tokens, embeddings = self.runner(np.stack([self.preprocess(a.image) for a in good]))
        per_image_ms = (time.perf_counter() - started) * 1000 / len(good)
        tokens = [layer.to(self.device, torch.float32) for layer in tokens]
        embeddings = embeddings.to(self.device, torch.float32)
        for index, arrival in enumerate(good):
            item = Item(
                arrival,
                [layer[index] for layer in tokens],
                embeddings[index],
                preview(arrival.image),
                arrival.shape,
                per_image_ms,
            )
            arrival.image = None  # the preview is all that is kept
            if self.rolling is None:
                self.in_hand.append(item)
            else:
                self._timed_commit(lambda item=item: self.rolling.add(item))

    def _score_batch(self) -> None:
        size = self.settings.batch_size
        items, self.in_hand = self.in_hand[:size], self.in_hand[size:]
        score = partial(
            score_batch,
            items,
            self.musc,
            self.settings.map_norm,
            self.known_good,
            self.recent_parts,
        )
        if self.scorer is None:
            self._timed_commit(score)
        else:
            self.scoring = self.scorer.submit(timed, score)

    def _collect_scored(self) -> bool:
        """Commit the batch scored in the worker, if it is done (its errors are raised here)."""
        if self.scoring is None or not self.scoring.done():
            return False
        future, self.scoring = self.scoring, None
        self._commit_answers(*future.result())
        return True

    def _timed_commit(self, score: Callable[[], list[Answer]]) -> None:
        self._commit_answers(*timed(score))

    def _current_batch(self) -> int:
        """Batch mode: a new number per scored batch. Rolling: groups of --batch-size lines."""
        last, records = self.journal.last_batch, self.journal.last_batch_records
        if self.rolling is not None and 0 < len(records) < self.settings.batch_size:
            return last
        if self.rolling is None and records and all(r.error for r in records):
            return last  # errors recorded while this batch was still being collected
        return last + 1

    def _commit(self, records: list[ResultRecord], context: CommitContext) -> None:
        for sink in self.sinks:
            sink.commit(records, context)

    def _commit_answers(self, answers: list[Answer], score_ms: float) -> None:
        """One commit of scored images: verdicts, records and visuals, through every sink."""
        if not answers:
            return
        batch = self._current_batch()
        now = time.monotonic()
        calibrated = self.judge.calibrated
        scores = [a.score for a in answers if judgeable(a.compared, calibrated)]
        threshold = self.judge.threshold(scores)
        self.recent.extend(scores)
        shift = self.judge.shifted(list(self.recent), threshold)
        records = []
        for answer in answers:
            item = answer.item
            verdict, why = verdict_of(answer.score, threshold, answer.compared, calibrated)
            overlay, mask = visual_paths(batch, item.arrival.file, threshold is not None)
            latency = (now - item.arrival.ready_at) * 1000
            self.stats.image_ms.append(latency)
            records.append(
                self._record(
                    item.arrival,
                    batch,
                    score=answer.score,
                    raw_score=answer.raw_score,
                    reference_score=answer.reference_score,
                    label=verdict,
                    threshold=threshold,
                    threshold_basis=self.judge.basis,
                    calibrated=self.judge.calibrated,
                    shift=shift,
                    repeated=answer.repeated,
                    joined_references=self._offer(answer, verdict),
                    overlay=overlay,
                    mask=mask,
                    warning="; ".join(filter(None, (item.arrival.note, answer.warning, why)))
                    or None,
                    timings=Timings(
                        round(item.features_ms, 2), round(score_ms, 2), round(latency, 2)
                    ),
                )
            )
        batch_ms = (now - max(a.item.arrival.ready_at for a in answers)) * 1000
        answers_by_file = {answer.item.arrival.file: answer for answer in answers}
        self._commit(records, CommitContext(batch, answers_by_file, batch_ms))
        self.judge.observe([a.score for a in answers], [record.label for record in records])
        self._count(records, batch_ms, threshold)

    def _offer(self, answer: Answer, verdict: str | None) -> bool:
        """--refresh-references: a clearly normal part may join the known-good references."""
        if self.known_good is None or verdict != NORMAL:
            return False
        joined = Joined(
            answer.item.arrival.file, answer.sets, answer.item.embedding, answer.raw_score
        )
        return self.known_good.offer(joined, answer.score)

    def _count(self, records: list[ResultRecord], batch_ms: float, threshold: float | None) -> None:
        stats = self.stats
        stats.last_batch_ms = batch_ms
        stats.scored += len(records)
        stats.batches += 1
        stats.anomalous += sum(r.label == ANOMALOUS for r in records)
        stats.unjudged += sum(r.label == UNJUDGED for r in records)
        stats.shifts += bool(records[0].shift)
        stats.repeated += sum(r.repeated for r in records)
        stats.joined += sum(r.joined_references for r in records)
        stats.threshold = threshold

    def _commit_errors(self, failures: list[Arrival]) -> None:
        batch = self._current_batch()
        out_dir = self.settings.out_dir
        records = [
            self._record(
                arrival,
                batch,
                error=arrival.error,
                rejected=set_aside(out_dir, arrival.path, arrival.file, arrival.sha256)
                if arrival.copyable
                else None,
            )
            for arrival in failures
        ]
        self._commit(records, CommitContext(batch))
        self.stats.failed += len(records)

    def _record(self, arrival: Arrival, batch: int, **fields) -> ResultRecord:
        return ResultRecord(
            *arrival.key,
            arrival.sha256,
            batch,
            self.settings.mode,
            model_sha256=self.model_sha256,
            **fields,
        )


def refuse_other_model(journal: Journal, package: ModelPackage) -> None:
    """An out folder holds one model's answers: its threshold history and batches must not
    mix two models (another export, another image size)."""
    others = journal.models - {package.sha256}
    if others:
        raise UsageError(
            f"{journal.path} holds results scored by another model package "
            f"(model_sha256 {sorted(others)[0][:16]}...); {package.folder} is "
            f"{package.sha256[:16]}... Give this package a new --out folder, or move the "
            "old results aside"
        )
