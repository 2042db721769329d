"""`musc-edge serve`: score many lines' batches on a Ray cluster, for stations on the line."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from musc_edge.cli.errors import user_errors
from musc_edge.cli.run_cmd import stop_on_signals

console = Console(soft_wrap=True)  # long paths stay whole in logs, whatever the width


def serve(
    config: Path = typer.Option(
        ..., "--config", help="plant.yaml: the lines (package, calibration) and the service."
    ),
    address: str | None = typer.Option(
        None, "--address", help="Ray cluster to deploy on (e.g. auto); default: a local one."
    ),
    host: str | None = typer.Option(None, "--host", help="Listen here (plant.yaml's host)."),
    port: int | None = typer.Option(None, "--port", help="HTTP port (plant.yaml's port)."),
    replicas: int | None = typer.Option(
        None, "--replicas", min=1, help="Scoring replicas (plant.yaml's replicas)."
    ),
) -> None:
    """Serve the lines of plant.yaml until stopped: stations run
    `musc-edge run --camera-dir DIR --remote URL --line NAME` and keep their journal, sinks and
    verdicts; the service scores their batches (docs/deployment.md, "A plant")."""
    from musc_edge.runtime.plant import load_plant

    flags = {"host": host, "port": port, "replicas": replicas}
    overrides: dict[str, Any] = {key: value for key, value in flags.items() if value is not None}
    with stop_on_signals() as stop, user_errors():
        settings = load_plant(config, overrides)
        from musc_edge.runtime.service import running_replicas, start_service, stop_service

        console.print(f"starting {settings.replicas} replica(s) for {len(settings.lines)} line(s)")
        try:
            url = start_service(settings, address)
            console.print(
                f"[bold]musc-edge serve[/] {url}: lines {', '.join(settings.lines)}; "
                f"{running_replicas()} replica(s) running\n"
                f"stations: musc-edge run --camera-dir DIR --remote {url} --line NAME"
            )
            watch_replicas(settings.replicas, stop)
        finally:
            stop_service()
        console.print("stopped")


def watch_replicas(wanted: int, stop: threading.Event, every: float = 10.0) -> None:
    """Until stopped, say when the running replicas change (a node lost, one started again)."""
    from musc_edge.runtime.service import running_replicas

    shown = wanted
    while not stop.wait(every):
        running = running_replicas()
        if running != shown:
            console.print(f"{time.strftime('%H:%M:%S')} replicas running: {running} of {wanted}")
            shown = running
