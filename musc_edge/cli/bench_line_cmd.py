"""`musc-edge bench line`: verdicts on line-like streams, through the real run loop."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from musc_edge.cli import options
from musc_edge.cli.errors import user_errors
from musc_edge.precision import Precision

console = Console(soft_wrap=True)  # long paths stay whole in logs, whatever the width


def bench_line(
    model: Path = typer.Option(..., "--model", "-m", help="Model package folder."),
    root: Path = typer.Option(..., "--root", help="MVTec-style dataset root."),
    category: str = typer.Option("bottle", "--category", "-c", help="Category to build from."),
    stream: list[str] = typer.Option(
        ["grouped"],
        "--stream",
        help="grouped, shuffled, defects-first, repeated, mixed or drift (repeatable).",
    ),
    mode: list[str] = typer.Option(["batch"], "--mode", help="batch or rolling (repeatable)."),
    overlap: list[str] = typer.Option(
        ["auto"], "--overlap", help="Batch mode: auto, on or off (repeatable, to compare)."
    ),
    batch_size: int = typer.Option(32, "--batch-size", "-n", min=1, help="Batch or window size."),
    calibration: Path | None = typer.Option(
        None, "--calibration", help="Known-good parts; its images never enter a stream."
    ),
    region: str | None = typer.Option(
        None, "--region", help="As for run: score only this box (x,y,width,height)."
    ),
    item: list[str] = typer.Option(
        [],
        "--item",
        help="As for run: an inspection item NAME:X,Y,WIDTH,HEIGHT[:CALIBRATION] (repeatable).",
    ),
    refresh_references: int = typer.Option(
        0, "--refresh-references", min=0, help="As for run: recent clearly-normal parts join."
    ),
    mutual: list[str] = typer.Option(
        ["off"],
        "--mutual",
        help="As for run, on or off (repeatable, to compare): calibrated parts also scored "
        "mutually, or judged by their known-good parts alone.",
    ),
    engine: options.Engine = options.EngineOpt,
    backbone_precision: Precision | None = options.BackbonePrecision,
    window: int | None = options.Window,
    json_out: Path | None = typer.Option(None, "--json", help="Write every figure as JSON."),
) -> None:
    """Build each stream, run `musc-edge run --once` over it and report recall, false rejects,
    the pooled AUROC of `score` and the flags the records carry."""
    from musc_edge.bench.line_streams import STREAMS, StreamSource, run_stream
    from musc_edge.files import write_json_atomic
    from musc_edge.musc import MuSc
    from musc_edge.package import load_package
    from musc_edge.runtime.runners import open_runner
    from musc_edge.runtime.settings import parse_item

    if bad := [value for value in overlap if value not in OVERLAP]:
        raise typer.BadParameter(f"--overlap takes auto, on or off, not {bad[0]!r}")
    if bad := [value for value in mutual if value not in SWITCH]:
        raise typer.BadParameter(f"--mutual takes on or off, not {bad[0]!r}")
    unknown = [name for name in stream if name not in STREAMS]
    if unknown:
        raise typer.BadParameter(f"unknown stream {unknown[0]!r}; choose {', '.join(STREAMS)}")
    rows = []
    with user_errors():
        package = load_package(model)
        runner = open_runner(package, engine.value, precision=backbone_precision)
        musc = MuSc.for_package(package, window=window)
        calibrations = [calibration, *(parse_item(text)[1]["calibration"] for text in item)]
        source = StreamSource(root, category, tuple(Path(p) for p in calibrations if p))
        settings = {
            "batch_size": batch_size,
            "calibration": calibration,
            "refresh_references": refresh_references,
            "region": region,
            "items": item,
        }
        streams = {name: STREAMS[name](source) for name in stream}  # all built before any run
        runs = [
            (name, chosen, lap, scoring)
            for name in streams
            for chosen in mode
            for lap in overlap
            for scoring in mutual
        ]
        for name, chosen, lap, scoring in runs:
            parts = streams[name]
            console.print(
                f"{name} stream, {len(parts)} parts, {chosen} mode, overlap {lap}, "
                f"mutual {scoring} ..."
            )
            line_settings = {
                **settings,
                "mode": chosen,
                "overlap": OVERLAP[lap],
                "mutual": SWITCH[scoring],
            }
            report = run_stream(parts, package, runner, musc, line_settings)
            rows.append(
                {"stream": name, "mode": chosen, "overlap": lap, "mutual": scoring, **report}
            )
            if json_out:  # after every row, so a long run keeps what it measured
                payload = {
                    "model": str(model),
                    "calibration": str(calibration),
                    "window": window,
                    "rows": rows,
                }
                write_json_atomic(json_out, payload)
    show(rows, all(row["uncalibrated_records"] == 0 for row in rows))
    if json_out:
        console.print(f"written to {json_out}")


OVERLAP = {"auto": None, "on": True, "off": False}  # LineSettings.overlap
SWITCH = {"on": True, "off": False}  # LineSettings.mutual


def optional(value: float | None, form: str) -> str:
    return "-" if value is None else form.format(value)


def show(rows: list[dict], calibrated: bool) -> None:
    table = Table(
        "stream",
        "mode",
        "overlap",
        "mutual",
        "parts",
        "recall %",
        "false rejects",
        "AUROC",
        "AUROC mutual",
        "shift",
        "repeated",
        "ms",
        "p95 ms",
        "score/features",
    )
    for row in rows:
        table.add_row(
            row["stream"],
            row["mode"],
            row["overlap"],
            row["mutual"],
            str(row["parts"]),
            optional(row["recall"], "{:.1f}"),
            f"{row['false_rejects']} of {row['good']}",
            optional(row["auroc"], "{:.2f}"),
            optional(row["auroc_mutual"], "{:.2f}"),
            str(row["shift_records"]),
            str(row["repeated_flags"]),
            f"{row['ms_per_part']:.0f}",
            optional(row["latency_p95_ms"], "{:.0f}"),
            optional(row["score_per_feature"], "{:.2f}"),
        )
    console.print(table)
    if not calibrated:
        console.print("[yellow]uncalibrated[/]: thresholds from each line's own history")
