"""The camera-folder line: watch, extract on arrival, schedule the scoring, commit.

Its collaborators, built once by `LineParts.build`, each have one job: the camera folder
(`camera.py`) hands out complete files, the backend (`backends.py`: this device, or a plant's
scoring service) prepares them, the scheduler (`schedulers.py`, one per `--mode`) says
when items are scored, `Verdicts` (`verdicts.py`) turns answers into labels and flags, and the
committer (`commits.py`) writes each commit's records through the sinks in the crash-safe
order `musc_edge.runtime.sinks` states. The journal is the only state: whatever it lacks after a
crash is scored again at the next start, whatever it holds is never scored again.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from musc_edge.errors import UsageError
from musc_edge.profile import Profile
from musc_edge.region import RegionOutsideImage
from musc_edge.runtime.backends import Backend
from musc_edge.runtime.camera import Arrival, CameraDir
from musc_edge.runtime.commits import Committer
from musc_edge.runtime.counts import Counts
from musc_edge.runtime.health import LineHealth
from musc_edge.runtime.inspections import Inspection
from musc_edge.runtime.journal import Journal
from musc_edge.runtime.lock import OutFolderLock
from musc_edge.runtime.outputs import preview
from musc_edge.runtime.record import ResultRecord
from musc_edge.runtime.schedulers import Scheduler, Scored
from musc_edge.runtime.scoring import Item, per_part
from musc_edge.runtime.settings import LineSettings
from musc_edge.runtime.sinks import SinkSetup, open_sinks


@dataclass
class LineStats:
    """What the terminal shows while the line runs; `counts` are this run's records."""

    counts: Counts = field(default_factory=Counts)
    seen: int = 0  # files: answered before this run, handed out and pending
    pending: int = 0
    batches: int = 0  # commits of scored images
    last_batch_ms: float | None = None  # last image ready -> committed
    image_ms: deque[float] = field(default_factory=lambda: deque(maxlen=1000))  # recent, ms
    resumed: int = 0  # results already in the journal at start
    dropped: int = 0  # torn journal lines cut off at start (those images are scored again)
    calibrated: bool = False  # False: thresholds from the line's own history
    threshold: float | None = None  # the latest one
    problem: str | None = None  # why the camera folder cannot be watched now
    profile: Profile = field(default_factory=Profile)  # the run's stage totals (ms)


@dataclass
class LineParts:
    """The line's collaborators, wired together once."""

    journal: Journal
    health: LineHealth
    camera: CameraDir
    inspections: list[Inspection]  # the whole image, its region, or its items
    scheduler: Scheduler
    committer: Committer

    @classmethod
    def build(cls, settings: LineSettings, backend: Backend, profile: Profile) -> LineParts:
        out_dir = settings.out_dir
        journal = Journal(out_dir)
        refuse_other_model(journal, backend.model_sha256, backend.model_name)
        health = LineHealth(out_dir)
        inspections = backend.inspections(settings, journal.records)
        camera = CameraDir(
            settings.camera_dir,
            journal.keys,
            settings.settle,
            settings.decode_timeout,
            exclude=out_dir,
            max_pixels=settings.max_pixels,
            answered_content=journal.contents,
            ignore=settings.ignore,
            # boxes are given in the file's own pixels: large frames are then decoded whole
            full_resolution=any(inspection.region for inspection in inspections),
        )
        scheduler = backend.scheduler(settings, [i.known_good for i in inspections])
        run_info = {
            "mode": settings.mode.value,
            "camera_dir": str(settings.camera_dir),
            **backend.run_info(),
            **inspections_info(inspections),
            "map_norm": settings.map_norm.value,
            "overlap": scheduler.overlaps,
            "scheduler": type(scheduler).__name__,  # AloneScheduler: judged alone, no MSM
        }
        setup = SinkSetup(out_dir, journal, run_info, health=health)
        sinks = open_sinks(setup, settings.sinks)
        mode = settings.mode.value
        committer = Committer(
            out_dir, journal, sinks, scheduler, inspections, mode, backend.model_sha256, profile
        )
        return cls(journal, health, camera, inspections, scheduler, committer)


def inspections_info(inspections: list[Inspection]) -> dict[str, Any]:
    """What the run's manifest says of the line's inspection: the one inspection's box and
    threshold, or every item's and their sum (a part is rejected when any item is, so its
    false-reject bound is at most the items' bounds added up)."""
    infos = [inspection_info(inspection) for inspection in inspections]
    if inspections[0].name is None:
        return {**infos[0], "items": []}
    bases = {info["threshold_basis"] for info in infos}
    bounds = [info["frr_upper_bound"] for info in infos]
    return {
        "threshold_basis": bases.pop() if len(bases) == 1 else "mixed",
        "calibration": None,
        "region": None,
        "known_good_parts": min(info["known_good_parts"] for info in infos),
        "frr_upper_bound": None if None in bounds else min(1.0, sum(bounds)),
        "items": [
            {"name": inspection.name, **info}
            for inspection, info in zip(inspections, infos, strict=True)
        ],
    }


def inspection_info(inspection: Inspection) -> dict[str, Any]:
    """One inspection's box and where its threshold comes from."""
    known_good, judge = inspection.known_good, inspection.verdicts.judge
    return {
        "threshold_basis": inspection.verdicts.basis,
        "calibration": str(inspection.calibration) if inspection.calibration else None,
        "region": inspection.region.to_json() if inspection.region else None,  # x, y, w, h
        # the judge's parts when they are elsewhere (a station of a scoring service)
        "known_good_parts": len(known_good) if known_good else judge.parts,
        "frr_upper_bound": judge.frr_upper_bound,  # how sure the calibration's threshold is
    }


def cut_arrival(arrival: Arrival, inspections: list[Inspection]) -> list[np.ndarray]:
    """A decoded image's pixels for each inspection item; an image that does not hold an
    item's box becomes an error record (the rest of the batch is still scored)."""
    if arrival.image is None:
        return []
    cuts = []
    try:
        for inspection in inspections:
            cuts.append(inspection.cut(arrival.image))
    except RegionOutsideImage as error:
        named = "" if inspection.name is None else f"item {inspection.name}: "
        arrival.error = f"{named}{error}"
        return []
    finally:
        arrival.image = None  # the cuts (views of it) and their previews are all that is kept
    return cuts


def refuse_other_model(journal: Journal, sha256: str, name: object) -> None:
    """An out folder holds one model's answers: its threshold history and batches must not
    mix two models (another export, another image size); `name` says where the model is."""
    others = journal.models - {sha256}
    if others:
        raise UsageError(
            f"{journal.path} holds results scored by another model package "
            f"(model_sha256 {sorted(others)[0][:16]}...); {name} is "
            f"{sha256[:16]}... Give this package a new --out folder, or move the "
            "old results aside"
        )


class Line:
    """One run of the line over a camera folder into an output folder."""

    def __init__(
        self,
        settings: LineSettings,
        backend: Backend,
        on_update: Callable[[LineStats], None] | None = None,
    ) -> None:
        if not settings.camera_dir.is_dir():
            raise UsageError(f"camera folder {settings.camera_dir} does not exist")
        self.settings = settings
        self.backend = backend
        self.on_update = on_update or (lambda stats: None)
        self.stats = LineStats()
        self.lock = OutFolderLock(settings.out_dir)
        try:
            self.parts = LineParts.build(settings, backend, self.stats.profile)
        except BaseException:
            self.lock.release()
            raise
        parts = self.parts
        self.journal, self.camera = parts.journal, parts.camera
        self.scheduler, self.inspections = parts.scheduler, parts.inspections
        self.stats.resumed = len(parts.journal.keys)
        self.stats.dropped = parts.journal.dropped_lines
        self.stats.calibrated = all(i.verdicts.calibrated for i in self.inspections)

    def run(self, stop: threading.Event | None = None) -> LineStats:
        """Until stopped (watch) or until the folder is done (once); returns the totals."""
        try:
            return self._loop(stop or threading.Event())
        finally:
            self.scheduler.close()
            for name, sink in self.parts.committer.sinks.items():
                with self.stats.profile.stage(f"close {name}"):
                    sink.flush()
                    sink.close()
            self.lock.release()

    def _loop(self, stop: threading.Event) -> LineStats:
        while True:
            self.camera.scan()
            self.parts.health.report("camera", self.camera.problem)
            self.parts.health.report("scoring", self.scheduler.problem)
            self.stats.problem = self.camera.problem or self.scheduler.problem
            stopping = stop.is_set()
            worked = False
            if not stopping:
                with self.stats.profile.stage("take"):  # settle checks, hashing, decoding
                    arrivals = self.camera.take(self.scheduler.room())
                worked = bool(arrivals)
                self._receive(arrivals)
            finishing = stopping or (not self.settings.watch and self.camera.pending == 0)
            ready, started = self.scheduler.ready(finishing)
            for scored in ready:
                self._commit(scored)
            worked = worked or bool(ready) or started
            self.stats.pending = self.camera.pending + self.scheduler.held
            self.stats.seen = self.stats.resumed + self.camera.handed_out + self.camera.pending
            self.on_update(self.stats)
            if finishing and not self.scheduler.busy:
                return self.stats
            if stopping and self.scheduler.problem:
                # parts that cannot be scored now (the scoring service is down) are left to
                # the next start: the journal lacks them, nothing is lost
                return self.stats
            if not worked:
                self.scheduler.wait(stop, self.settings.poll)

    def _receive(self, arrivals: list[Arrival]) -> None:
        """Errors are recorded at once; images are prepared now (features extracted, or
        resized for a scoring service), not when scored."""
        cuts = [cut_arrival(arrival, self.inspections) for arrival in arrivals]
        failures = [a for a in arrivals if a.error is not None]
        if failures:
            self._count(self.parts.committer.failures(failures))
        good = [(a, cut) for a, cut in zip(arrivals, cuts, strict=True) if a.error is None]
        if not good:
            return
        features = Profile()
        per_inspection = []
        with features.stage("features"):
            for index, inspection in enumerate(self.inspections):
                images = [cut[index] for _, cut in good]
                per_inspection.append((inspection, images, self.backend.prepare(images)))
        self.stats.profile.add(features)
        per_image_ms = features.ms["features"] / len(good)
        parts = [[] for _ in good]
        for inspection, images, prepared in per_inspection:
            for index, (arrival, _) in enumerate(good):
                parts[index].append(
                    Item(
                        arrival,
                        preview=preview(images[index]),
                        shape=arrival.shape,
                        features_ms=per_image_ms,
                        region=inspection.region,
                        **{"tokens": None, "embedding": None, **prepared[index]},
                    )
                )
        for scored in self.scheduler.add(parts):
            self._commit(scored)

    def _commit(self, scored: Scored) -> None:
        """One commit of scored images: verdicts, then records through every sink."""
        parts, scoring = scored
        if not parts:
            return
        self.stats.profile.add(scoring)
        per_inspection = [
            inspection.verdicts.decide([answers[index] for answers in parts])
            for index, inspection in enumerate(self.inspections)
        ]
        records, batch_ms = self.parts.committer.answers(parts, per_part(per_inspection), scoring)
        stats = self.stats
        stats.last_batch_ms = batch_ms
        stats.batches += 1
        stats.threshold = records[0].threshold
        stats.image_ms.extend(record.timings.latency_ms for record in records)
        self._count(records)

    def _count(self, records: list[ResultRecord]) -> None:
        for record in records:
            self.stats.counts.add(record.to_dict())
