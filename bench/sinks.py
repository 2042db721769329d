"""What the extra sinks cost the line: the real `Line` over the same images without them and
with them, alternated in one process so that a machine whose speed drifts moves both arms alike.

Each run copies the images into a fresh camera folder and runs `Line` once (`watch=False`,
`settle=0`). The line times every sink's `commit`, `flush` and `close` itself (its run profile,
musc_edge/profile.py), so a run says how long the line's own thread spent inside the extra
sinks' calls (the direct cost) apart from what the sinks' threads take from the same cores
(the indirect cost, seen only in the totals).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from musc_edge.errors import UsageError
from musc_edge.images import list_images
from musc_edge.musc import MuSc
from musc_edge.package import ModelPackage
from musc_edge.runtime.backends import LocalBackend
from musc_edge.runtime.line import Line
from musc_edge.runtime.runners import Runner
from musc_edge.runtime.settings import LineSettings
from musc_edge.runtime.sinks import (
    CRASH_SAFE_ORDER,
    SinkSpecs,
    parse_sink_spec,
)
from musc_edge.runtime.sinks.outbox import backlog

ARMS = ("plain", "sinks")
# figures summarised per arm; the first three are compared as with-sinks / plain
COMPARED = ("ms_per_image", "loop_ms_per_image", "latency_ms")
SUMMARISED = (*COMPARED, "wall_s", "sink_commit_ms_per_image", "open_s", "stop_s")


def sink_specs(texts: Sequence[str]) -> dict[str, dict[str, str]]:
    """`--sink NAME:KEY=VALUE,...` texts -> options by sink name, as `run` reads them."""
    specs: dict[str, dict[str, str]] = {}
    for text in texts:
        name, given = parse_sink_spec(text)
        specs[name] = {**specs.get(name, {}), **given}
    return specs


def pick_images(folder: Path, count: int) -> list[Path]:
    """The first `count` images of the folder in name order; too few is a usage error, since
    repeating files would give the line copies it answers from its journal, not scores."""
    if not folder.is_dir():
        raise UsageError(f"images folder {folder} does not exist")
    images = list_images(folder)
    if len(images) < count:
        raise UsageError(f"{folder} holds {len(images)} images; --count {count} needs that many")
    return images[:count]


@dataclass
class RunFigures:
    """One run of the line; wall = open + loop + stop."""

    arm: str
    images: int
    open_s: float  # Line() built: journal, camera, sinks opened (a broker connection, a server)
    loop_s: float  # scanning, features, scoring and every commit
    stop_s: float  # every sink's flush and close (a network sink waits for its backlog here)
    latency_ms: float  # median of the records' timings.latency_ms (file ready -> committed)
    sink_commit_s: float  # inside the extra sinks' commit calls
    commit_s_by_sink: dict[str, float] = field(default_factory=dict)  # the same, per sink
    backlog: dict[str, int] = field(default_factory=dict)  # undelivered after the run, per sink

    @property
    def wall_s(self) -> float:
        return self.open_s + self.loop_s + self.stop_s

    def as_dict(self) -> dict[str, Any]:
        per_image = 1000 / self.images
        return {
            **asdict(self),
            "wall_s": self.wall_s,
            "ms_per_image": self.wall_s * per_image,
            "loop_ms_per_image": self.loop_s * per_image,
            "sink_commit_ms_per_image": self.sink_commit_s * per_image,
        }


def run_once(
    arm: str,
    images: list[Path],
    package: ModelPackage,
    runner: Runner,
    musc: MuSc,
    settings: dict[str, Any],
    sinks: SinkSpecs,
) -> RunFigures:
    """Copy the images into a fresh camera folder and run the line over it to the end."""
    with tempfile.TemporaryDirectory(prefix="musc-edge-sink-bench-") as scratch:
        camera, out = Path(scratch) / "camera", Path(scratch) / "results"
        camera.mkdir()
        for index, path in enumerate(images):  # numbered: names in subfolders may repeat
            shutil.copyfile(path, camera / f"{index:04d}_{path.name}")
        line_settings = LineSettings(
            camera, out, watch=False, settle=0.0, poll=0.05, sinks=sinks, **settings
        )
        started = time.perf_counter()
        line = Line(line_settings, LocalBackend(package, runner, musc))
        opened = time.perf_counter()
        line.run()
        ended = time.perf_counter()
        records = list(line.journal.records())
        left = backlog(out)
    failed = [record for record in records if record.error]
    if failed:
        raise UsageError(f"{failed[0].file} could not be scored: {failed[0].error}")
    stages = line.stats.profile.ms
    stop_s = sum(ms for name, ms in stages.items() if name.startswith("close ")) / 1000
    extra = [name for name in line.parts.committer.sinks if name not in CRASH_SAFE_ORDER]
    commit_s = {name: stages.get(f"sink {name}", 0.0) / 1000 for name in extra}
    latencies = [record.timings.latency_ms or 0.0 for record in records]
    return RunFigures(
        arm,
        len(records),
        open_s=opened - started,
        loop_s=ended - opened - stop_s,
        stop_s=stop_s,
        latency_ms=statistics.median(latencies),
        sink_commit_s=sum(commit_s.values()),
        commit_s_by_sink=commit_s,
        backlog=left,
    )


def measure(
    images: list[Path],
    package: ModelPackage,
    runner: Runner,
    musc: MuSc,
    settings: dict[str, Any],
    sinks: SinkSpecs,
    runs: int,
    on_run: Callable[[str, RunFigures], None] = lambda label, figures: None,
) -> dict[str, Any]:
    """One untimed run of each arm (with sinks first: a refused option stops it at once),
    then plain and with-sinks alternated `runs` times."""
    by_arm: dict[str, SinkSpecs] = {"plain": {}, "sinks": sinks}
    report: dict[str, Any] = {"warmup": {}, "runs": {arm: [] for arm in ARMS}}
    for arm in reversed(ARMS):
        figures = run_once(arm, images, package, runner, musc, settings, by_arm[arm])
        report["warmup"][arm] = figures.as_dict()
        on_run("warm-up", figures)
    for index in range(runs):
        for arm in ARMS:
            figures = run_once(arm, images, package, runner, musc, settings, by_arm[arm])
            report["runs"][arm].append(figures.as_dict())
            on_run(f"run {index + 1}/{runs}", figures)
    report["summary"] = summarise(report["runs"])
    return report


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians and spread per arm; with-sinks / plain of the medians and of each pair of runs
    (the pairs ran back to back, so their ratios shrug off slow drifts of the machine)."""
    summary: dict[str, Any] = {
        arm: {name: spread([run[name] for run in runs[arm]]) for name in SUMMARISED} for arm in ARMS
    }
    summary["ratio"] = {
        name: summary["sinks"][name]["median"] / summary["plain"][name]["median"]
        for name in COMPARED
    }
    pairs = list(zip(runs["plain"], runs["sinks"], strict=True))
    summary["pair_ratio"] = {
        name: spread([sinks[name] / plain[name] for plain, sinks in pairs]) for name in COMPARED
    }
    summary["commit_share"] = (
        summary["sinks"]["sink_commit_ms_per_image"]["median"]
        / summary["plain"]["ms_per_image"]["median"]
    )
    summary["commit_ms_per_image_by_sink"] = {
        name: statistics.median(
            1000 * run["commit_s_by_sink"][name] / run["images"] for run in runs["sinks"]
        )
        for name in runs["sinks"][0]["commit_s_by_sink"]
    }
    summary["backlog"] = runs["sinks"][-1]["backlog"]
    return summary
