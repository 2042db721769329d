"""`musc-edge bench serve`: parts per second and latency through the plant's scoring service
(one or more replicas and stations) against the line's own `run`, in one process."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from musc_edge.cli import options
from musc_edge.cli.errors import user_errors

console = Console(soft_wrap=True)  # long paths stay whole in logs, whatever the width


def bench_serve(
    model: Path = typer.Option(..., "--model", "-m", help="Model package folder."),
    images: Path = typer.Option(..., "--images", help="Folder of images each station scores."),
    count: int = typer.Option(40, "--count", min=1, help="Images per station (the first N)."),
    batch_size: int = typer.Option(8, "--batch-size", "-n", min=1, help="The lines' batch."),
    replicas: list[int] = typer.Option([1, 2], "--replicas", help="Replica counts (repeatable)."),
    stations: list[int] = typer.Option(
        [1, 2], "--stations", help="Stations at once, each its own line (repeatable)."
    ),
    cpus_per_replica: float | None = typer.Option(
        None, "--cpus-per-replica", min=0.1, help="Default: this machine's cores / replicas."
    ),
    rounds: int = typer.Option(2, "--rounds", min=1, help="Timed runs of each arm, alternated."),
    engine: options.Engine = options.EngineOpt,
    json_out: Path | None = typer.Option(None, "--json", help="Write every figure as JSON."),
) -> None:
    """Start the service on a local Ray instance for each replica count, run 1..N stations
    over copies of the same images at once, and report parts per second and median latency
    beside the local `run` on the same images (after one warm-up of each arm)."""
    from musc_edge.bench.serve import as_json, measure
    from musc_edge.bench.sinks import pick_images
    from musc_edge.cli.bench_cmd import environment
    from musc_edge.files import write_json_atomic
    from musc_edge.musc import MuSc
    from musc_edge.package import load_package
    from musc_edge.runtime.backends import LocalBackend
    from musc_edge.runtime.runners import open_runner

    with user_errors():
        paths = pick_images(images, count)
        package = load_package(model)
        runner = open_runner(package, engine.value)
        local = LocalBackend(package, runner, MuSc.for_package(package))
        console.print(
            f"[bold]{package.backbone}[/] {package.image_size}px, {runner.description}, "
            f"{count} images per station, batch {batch_size}; load {os.getloadavg()[0]:.2f}"
        )
        runs = measure(
            local, paths, batch_size, replicas, stations, rounds, cpus_per_replica,
            on_run=lambda run: console.print(
                f"round {run.round} {run.arm}: {run.wall_s:.1f} s, {run.parts_per_s:.2f} "
                f"parts/s, latency {run.latency_ms:.0f} ms"
            ),
        )  # fmt: skip
    report = {"model": str(model), "images": str(images), "count": count,
              "batch_size": batch_size, "engine": runner.description,
              "environment": environment(), **as_json(runs)}  # fmt: skip
    table = Table("arm", "runs", "parts/s", "vs local", "wall s", "median latency ms")
    for row in report["summary"]:
        table.add_row(
            row["arm"], str(row["runs"]), f"{row['parts_per_s']:.2f}", f"{row['vs_local']:.2f}",
            f"{row['wall_s']:.1f}", f"{row['latency_ms']:.0f}",
        )  # fmt: skip
    console.print(table)
    console.print("medians over the rounds; 'vs local' divides parts/s by the local run's")
    if json_out:
        write_json_atomic(json_out, report)
        console.print(f"written to {json_out}")
