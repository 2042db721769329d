"""`musc-edge rescore`: what a package and calibration would have said of an archive."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from musc_edge.cli import options
from musc_edge.cli.errors import user_errors
from musc_edge.cli.progress import progress_bar

console = Console(soft_wrap=True)  # long paths stay whole in logs, whatever the width


def rescore(
    archive: Path = typer.Option(
        ..., "--archive", help="Folder of archived part images, or a file listing them."
    ),
    model: Path = typer.Option(..., "--model", help="Model package folder (musc-edge export)."),
    out: Path = typer.Option(
        ..., "--out", help="Results folder: results.jsonl (resumed), results.parquet, summary."
    ),
    calibration: Path | None = typer.Option(
        None, "--calibration", help="Known-good parts (musc-edge calibrate), as for run."
    ),
    threshold: list[float] = typer.Option(
        [], "--threshold", help="Also count the parts above this score (repeatable)."
    ),
    address: str | None = typer.Option(
        None,
        "--address",
        help="Ray cluster to run on (e.g. ray://head:10001 or auto); default: a local one.",
    ),
    workers: int = typer.Option(
        1, "--workers", min=1, help="Scoring actors, each with its own runner (one per GPU)."
    ),
    cpus_per_worker: float = typer.Option(
        1, "--cpus-per-worker", min=0.1, help="CPUs Ray reserves for each actor (its threads)."
    ),
    batch_size: int = typer.Option(
        32, "--batch-size", min=1, help="Images scored together, as the line's --batch-size."
    ),
    mutual: bool = typer.Option(
        False, "--mutual", help="As for run: calibrated parts also scored mutually."
    ),
    engine: options.Engine = options.EngineOpt,
) -> None:
    """Re-score an archive on Ray: one record per image in OUT (the fields `run` writes),
    and how many parts would have been rejected, per folder and per day.

    The images are scored in the line's order and batches (modification time, then path), so
    the scores are those `musc-edge run --once` gives over the same folder. An interrupted
    re-score resumes: images already in OUT/results.jsonl are skipped.
    """
    from musc_edge.runtime.rescore import run_rescore

    with user_errors(), progress_bar(console) as bar:
        task = bar.add_task("re-scoring", total=None)
        summary = run_rescore(
            archive,
            model,
            out,
            calibration,
            threshold,
            address,
            workers,
            batch_size,
            engine.value,
            cpus_per_worker,
            on_batch=lambda done, total: bar.update(task, completed=done, total=total),
            mutual=mutual,
        )
    show(summary.to_dict())
    console.print(f"records: {out / 'results.jsonl'} and {out / 'results.parquet'}")


def show(summary: dict) -> None:
    """The rejected parts per folder and per day, one table each."""
    for kind in ("folder", "day"):
        groups = summary.get(kind, {})
        if not groups:
            continue
        columns = list(next(iter(groups.values())))
        table = Table(kind, *columns)
        for name, counts in sorted(groups.items()):
            table.add_row(name, *(str(counts[column]) for column in columns))
        console.print(table)
