"""The camera-folder line: watch, extract on arrival, schedule the scoring, commit.

Its collaborators, built once by `LineParts.build`, each have one job: the camera folder
(`camera.py`) hands out complete files, the scheduler (`schedulers.py`, one per `--mode`) says
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

import numpy as np
import torch

from musc_edge.calibration import load_calibration
from musc_edge.errors import UsageError
from musc_edge.musc import MuSc
from musc_edge.package import ModelPackage
from musc_edge.parallel import usable_cores
from musc_edge.profile import Profile
from musc_edge.region import Region, RegionOutsideImage
from musc_edge.runtime.camera import Arrival, CameraDir
from musc_edge.runtime.commits import Committer
from musc_edge.runtime.counts import Counts
from musc_edge.runtime.health import LineHealth
from musc_edge.runtime.journal import Journal
from musc_edge.runtime.known_good import KnownGood
from musc_edge.runtime.lock import OutFolderLock
from musc_edge.runtime.outputs import preview
from musc_edge.runtime.record import ResultRecord
from musc_edge.runtime.runners import Runner
from musc_edge.runtime.schedulers import SCHEDULERS, Scheduler, Scored
from musc_edge.runtime.scoring import Item
from musc_edge.runtime.settings import LineSettings
from musc_edge.runtime.sinks import SinkSetup, open_sinks
from musc_edge.runtime.verdicts import Verdicts


def overlap_helps() -> bool:
    """Whether extracting the next images while a batch is scored pays here: with a GPU, or
    with more than one core (measured on two: 14 % less time per part, docs/benchmarks.md)."""
    return torch.cuda.is_available() or usable_cores() > 1


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
    verdicts: Verdicts
    scheduler: Scheduler
    committer: Committer

    @classmethod
    def build(
        cls,
        settings: LineSettings,
        package: ModelPackage,
        runner: Runner,
        musc: MuSc,
        profile: Profile,
    ) -> LineParts:
        out_dir = settings.out_dir
        journal = Journal(out_dir)
        refuse_other_model(journal, package)
        health = LineHealth(out_dir)
        camera = CameraDir(
            settings.camera_dir,
            journal.keys,
            settings.settle,
            settings.decode_timeout,
            exclude=out_dir,
            max_pixels=settings.max_pixels,
            answered_content=journal.contents,
            ignore=settings.ignore,
            full_resolution=settings.region is not None,
        )
        known_good = None
        if settings.calibration is not None:
            calibration = load_calibration(settings.calibration, package)
            calibration.check_region(region_of(settings), settings.calibration)
            known_good = KnownGood(calibration, settings.refresh_references, musc.precision.dtype)
        verdicts = Verdicts.for_line(
            settings.threshold, known_good, journal.records(), settings.batch_size
        )
        overlap = overlap_helps() if settings.overlap is None else settings.overlap
        options = {"overlap": overlap} if settings.mode == "batch" else {}
        scheduler = SCHEDULERS[settings.mode](
            musc,
            settings.batch_size,
            settings.map_norm.value,
            known_good,
            package.max_batch,
            settings.max_wait if settings.watch else None,
            **options,
        )
        run_info = {
            "mode": settings.mode.value,
            "camera_dir": str(settings.camera_dir),
            "model": str(package.folder),
            "model_sha256": package.sha256,
            "backbone": package.backbone,
            "image_size": package.image_size,
            "engine": runner.description,
            "msm_precision": musc.precision.value,
            "window": musc.window,  # positional MSM (docs/positional.md), None: global
            "musc": {"r_list": musc.r_list, "frac": musc.frac, "k_list": musc.k_list},
            "threshold_basis": verdicts.basis,
            "calibration": str(settings.calibration) if settings.calibration else None,
            "region": list(settings.region) if settings.region else None,  # x, y, width, height
            "known_good_parts": len(known_good) if known_good else 0,
            # how sure the calibration's threshold is (musc_edge/calibration.py)
            "frr_upper_bound": (
                known_good.calibration.summary()["frr_upper_bound"] if known_good else None
            ),
            "map_norm": settings.map_norm.value,
            "overlap": bool(options.get("overlap")),
        }
        setup = SinkSetup(out_dir, journal, run_info, health=health)
        sinks = open_sinks(setup, settings.sinks)
        mode = settings.mode.value
        committer = Committer(out_dir, journal, sinks, scheduler, mode, package.sha256, profile)
        return cls(journal, health, camera, verdicts, scheduler, committer)


def region_of(settings: LineSettings) -> Region | None:
    return None if settings.region is None else Region(*settings.region)


def crop_arrival(arrival: Arrival, region: Region) -> None:
    """Cut a decoded image to the line's region; one the box does not fit becomes an error
    record (the rest of the batch is still scored)."""
    if arrival.image is None:
        return
    try:
        arrival.image = region.crop(arrival.image)
    except RegionOutsideImage as error:
        arrival.image, arrival.error = None, str(error)


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
        if not settings.camera_dir.is_dir():
            raise UsageError(f"camera folder {settings.camera_dir} does not exist")
        self.settings = settings
        self.runner = runner
        self.preprocess = package.preprocessing()
        self.region = region_of(settings)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.on_update = on_update or (lambda stats: None)
        self.stats = LineStats()
        self.lock = OutFolderLock(settings.out_dir)
        try:
            self.parts = LineParts.build(settings, package, runner, musc, self.stats.profile)
        except BaseException:
            self.lock.release()
            raise
        parts = self.parts
        self.journal, self.camera = parts.journal, parts.camera
        self.scheduler, self.verdicts = parts.scheduler, parts.verdicts
        self.stats.resumed = len(parts.journal.keys)
        self.stats.dropped = parts.journal.dropped_lines
        self.stats.calibrated = self.verdicts.calibrated

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
            self.stats.problem = self.camera.problem
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
            if not worked:
                self.scheduler.wait(stop, self.settings.poll)

    def _receive(self, arrivals: list[Arrival]) -> None:
        """Errors are recorded at once; images get their features now, not when scored."""
        if self.region is not None:
            for arrival in arrivals:
                crop_arrival(arrival, self.region)
        failures = [a for a in arrivals if a.error is not None]
        if failures:
            self._count(self.parts.committer.failures(failures))
        good = [a for a in arrivals if a.error is None]
        if not good:
            return
        features = Profile()
        with features.stage("features"):
            tokens, embeddings = self.runner(np.stack([self.preprocess(a.image) for a in good]))
        self.stats.profile.add(features)
        per_image_ms = features.ms["features"] / len(good)
        tokens = [layer.to(self.device, torch.float32) for layer in tokens]
        embeddings = embeddings.to(self.device, torch.float32)
        items = []
        for index, arrival in enumerate(good):
            items.append(
                Item(
                    arrival,
                    [layer[index] for layer in tokens],
                    embeddings[index],
                    preview(arrival.image),
                    arrival.shape,
                    per_image_ms,
                )
            )
            arrival.image = None  # the preview is all that is kept
        for scored in self.scheduler.add(items):
            self._commit(scored)

    def _commit(self, scored: Scored) -> None:
        """One commit of scored images: verdicts, then records through every sink."""
        answers, scoring = scored
        if not answers:
            return
        self.stats.profile.add(scoring)
        verdicts = self.verdicts.decide(answers)
        records, batch_ms = self.parts.committer.answers(answers, verdicts, scoring)
        stats = self.stats
        stats.last_batch_ms = batch_ms
        stats.batches += 1
        stats.threshold = verdicts[0].threshold
        stats.image_ms.extend(record.timings.latency_ms for record in records)
        self._count(records)

    def _count(self, records: list[ResultRecord]) -> None:
        for record in records:
            self.stats.counts.add(record.to_dict())
