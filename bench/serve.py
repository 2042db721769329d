"""What the plant's scoring service gives a line: parts per second and latency through
`musc-edge serve` with one or more replicas and stations, against the line's own `run` on the
same images in the same process.

Each arm copies the images into fresh camera folders and runs the real `Line` once over each
(`watch=False`, `settle=0`): the local arm with the package's runner here, a service arm with
one station per camera folder, all at once (threads of this process), each a line of the plant
(`RemoteBackend`), while the service (a local Ray instance) runs its replicas in their own
processes. Parts per second is all stations' parts over the wall time until the last is done;
latency is each record's file-ready-to-committed time.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from musc_edge.parallel import usable_cores
from musc_edge.runtime.addresses import free_port
from musc_edge.runtime.backends import Backend, LocalBackend
from musc_edge.runtime.line import Line
from musc_edge.runtime.settings import LineSettings

LOCAL = "local run"


@dataclass
class ArmRun:
    """One timed run of an arm."""

    arm: str
    round: int
    parts: int
    wall_s: float
    parts_per_s: float
    latency_ms: float  # median over all its records


def run_lines(
    backends: Sequence[Backend], paths: Sequence[Path], batch_size: int, folder: Path
) -> tuple[float, list[float]]:
    """One line per backend over its own copy of the images, all at once: the wall time and
    every record's latency (ms)."""
    settings = []
    for index in range(len(backends)):
        camera = folder / f"camera-{index}"
        camera.mkdir()
        for path in paths:
            shutil.copy(path, camera / path.name)
        settings.append(
            LineSettings(
                camera, folder / f"out-{index}", batch_size=batch_size, watch=False, settle=0.0
            )
        )
    lines = [Line(s, backend) for s, backend in zip(settings, backends, strict=True)]
    errors: list[BaseException] = []

    def run(line: Line) -> None:
        try:
            line.run()
        except BaseException as error:
            errors.append(error)

    started = time.perf_counter()
    threads = [threading.Thread(target=run, args=(line,)) for line in lines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    latencies = [
        record.timings.latency_ms
        for line in lines
        for record in line.journal.records()
        if record.error is None
    ]
    return wall, latencies


def timed(
    arm: str, round_: int, backends: Sequence[Backend], paths: Sequence[Path], batch_size: int
) -> ArmRun:
    with tempfile.TemporaryDirectory(prefix="musc-bench-serve-") as folder:
        wall, latencies = run_lines(backends, paths, batch_size, Path(folder))
    parts = len(backends) * len(paths)
    return ArmRun(arm, round_, parts, wall, parts / wall, statistics.median(latencies))


def measure(
    local: LocalBackend,
    paths: Sequence[Path],
    batch_size: int,
    replicas: Sequence[int],
    stations: Sequence[int],
    rounds: int,
    cpus_per_replica: float | None,
    on_run: Callable[[ArmRun], None] = lambda run: None,
) -> list[ArmRun]:
    """Every arm `rounds` times (after one warm-up each), the local run beside each service
    configuration's rounds so that drift moves them alike."""
    from musc_edge.runtime.plant import plant_settings
    from musc_edge.runtime.remote import RemoteBackend, ServiceClient
    from musc_edge.runtime.service import start_service, stop_service
    from musc_edge.runtime.settings import Engine

    runs: list[ArmRun] = []
    for count in replicas:
        lines = {f"line-{i}": {"model": local.package.folder} for i in range(max(stations))}
        settings = plant_settings(
            {
                "lines": lines,
                "replicas": count,
                # default: the machine's cores shared by the replicas
                "cpus_per_replica": cpus_per_replica or max(1.0, usable_cores() / count),
                "port": free_port(),
                "engine": Engine(local.runner.name),
            },
            "bench",
        )
        url = start_service(settings, None)
        try:
            clients = [ServiceClient(url, name, 600) for name in lines]
            remote = [RemoteBackend(client, client.spec()) for client in clients]
            arms = {
                LOCAL: [local],
                **{f"{count} replica(s), {k} station(s)": remote[:k] for k in stations},
            }
            for round_ in range(rounds + 1):  # round 0: the warm-up, not kept
                for arm, backends in arms.items():
                    run = timed(arm, round_, backends, paths, batch_size)
                    if round_:
                        runs.append(run)
                        on_run(run)
        finally:
            stop_service()
    return runs


def summary(runs: Sequence[ArmRun]) -> list[dict[str, Any]]:
    """Per arm: the median of each figure over its runs, and parts per second against the
    local run's."""
    arms = dict.fromkeys(run.arm for run in runs)
    local = statistics.median(run.parts_per_s for run in runs if run.arm == LOCAL)
    rows = []
    for arm in arms:
        mine = [run for run in runs if run.arm == arm]
        row = {
            "arm": arm,
            "runs": len(mine),
            **{
                name: statistics.median(getattr(run, name) for run in mine)
                for name in ("parts", "wall_s", "parts_per_s", "latency_ms")
            },
        }
        row["vs_local"] = row["parts_per_s"] / local
        rows.append(row)
    return rows


def as_json(runs: Sequence[ArmRun]) -> dict[str, Any]:
    return {"runs": [asdict(run) for run in runs], "summary": summary(runs)}
