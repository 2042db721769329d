"""`musc-edge bench sinks`: what extra sinks add to the line's time per image, measured by
running the real line over the same images without and with them in one process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from musc_edge.cli import options
from musc_edge.cli.errors import user_errors
from musc_edge.runtime.settings import Mode

console = Console(soft_wrap=True)  # long paths stay whole in logs, whatever the width

ROWS = {  # summary figure -> row label, in the order shown
    "wall_s": "wall s",
    "ms_per_image": "ms / image (wall / images)",
    "loop_ms_per_image": "ms / image (loop: no open, no stop)",
    "latency_ms": "median latency ms (ready -> committed)",
    "sink_commit_ms_per_image": "in the sinks' commit, ms / image",
    "open_s": "open s (line and sinks)",
    "stop_s": "stop s (flush and close)",
}


def bench_sinks(
    model: Path = typer.Option(..., "--model", "-m", help="Model package folder."),
    images: Path = typer.Option(..., "--images", help="Folder of images to run the line on."),
    count: int = typer.Option(32, "--count", min=1, help="Images per run (the first N by name)."),
    mode: Mode = typer.Option(Mode.batch, "--mode", help="batch or rolling."),
    batch_size: int = typer.Option(32, "--batch-size", "-n", min=1, help="Batch or window size."),
    engine: options.Engine = options.EngineOpt,
    sink: list[str] = typer.Option(
        ..., "--sink", help="Extra sink as for run, NAME:KEY=VALUE,... (repeatable)."
    ),
    runs: int = typer.Option(3, "--runs", min=1, help="Timed runs of each arm, alternated."),
    json_out: Path | None = typer.Option(None, "--json", help="Write every figure as JSON."),
    allow_random_init: bool = typer.Option(False, "--allow-random-init", hidden=True),
) -> None:
    """Run the line without and with the given sinks (plain, sinks, plain, ... after one
    warm-up of each) and report time per image, latency, time inside the sinks' commits and
    the ratio. The sinks' receivers are not started here: point the sinks at yours."""
    from musc_edge.bench.sinks import measure, pick_images, sink_specs
    from musc_edge.cli.bench_cmd import environment
    from musc_edge.files import write_json_atomic
    from musc_edge.musc import MuSc
    from musc_edge.package import load_package
    from musc_edge.runtime.runners import open_runner

    with user_errors():
        sinks = sink_specs(sink)
        paths = pick_images(images, count)
        package = load_package(model)
        runner = open_runner(package, engine.value, allow_random_init=allow_random_init)
        musc = MuSc.for_package(package)
        load_before = os.getloadavg()
        console.print(
            f"[bold]{package.backbone}[/] {package.image_size}px, {runner.description}, "
            f"{mode.value} mode, {count} images, sinks {', '.join(sinks)}; "
            f"load {load_before[0]:.2f}"
        )
        settings = {"mode": mode.value, "batch_size": batch_size}
        report = measure(paths, package, runner, musc, settings, sinks, runs, show_run)
    report = {
        "model": str(model),
        "images": str(images),
        "count": count,
        "mode": mode.value,
        "batch_size": batch_size,
        "engine": runner.description,
        "sinks": sinks,
        "load_average": {"start": load_before, "end": os.getloadavg()},
        "environment": environment(),
        **report,
    }
    show(report)
    if json_out:
        write_json_atomic(json_out, report)
        console.print(f"written to {json_out}")


def show_run(label: str, figures: Any) -> None:
    """One line per run, so a long benchmark shows progress and its noise as it goes."""
    row = figures.as_dict()
    by_sink = ", ".join(
        f"{name} {1000 * seconds / row['images']:.2f}"
        for name, seconds in row["commit_s_by_sink"].items()
    )
    console.print(
        f"{label} {row['arm']}: {row['wall_s']:.2f} s, {row['ms_per_image']:.0f} ms/image, "
        f"latency {row['latency_ms']:.0f} ms, in sinks {row['sink_commit_ms_per_image']:.2f} "
        f"ms/image ({by_sink or '-'}), backlog {row['backlog'] or '-'}"
    )


def show(report: dict[str, Any]) -> None:
    """Medians with their spread per arm, and with-sinks / plain."""
    summary = report["summary"]
    table = Table("", "plain", "with sinks", "sinks / plain", "per pair")
    for name, label in ROWS.items():
        cells = [_spread(summary[arm][name]) for arm in ("plain", "sinks")]
        if name in summary["ratio"]:
            cells += [f"{summary['ratio'][name]:.3f}", _spread(summary["pair_ratio"][name])]
        table.add_row(label, *cells)
    console.print(table)
    by_sink = ", ".join(
        f"{name} {ms:.2f}" for name, ms in summary["commit_ms_per_image_by_sink"].items()
    )
    load = report["load_average"]
    console.print(
        f"medians of {len(report['runs']['plain'])} runs \\[min-max]; 'sinks / plain' divides "
        "the medians, 'per pair' each with-sinks run by the plain run just before it. The "
        f"sinks' commits ({by_sink} ms/image) are {100 * summary['commit_share']:.2f} % of the "
        f"plain time per image; backlog after the last run {summary['backlog'] or 'none'}; "
        "load average "
        f"{load['start'][0]:.2f} -> {load['end'][0]:.2f}"
    )


def _spread(figures: dict[str, float]) -> str:
    digits = 3 if figures["max"] < 10 else 1
    return (
        f"{figures['median']:.{digits}f} [{figures['min']:.{digits}f}-{figures['max']:.{digits}f}]"
    )
