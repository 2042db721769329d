"""`musc-edge run`: score the images a camera writes into a folder, as they arrive."""

from __future__ import annotations

import contextlib
import enum
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.console import Console
from rich.live import Live

from musc_edge.cli import options
from musc_edge.cli.errors import user_errors
from musc_edge.cli.line_config import merge_line_config
from musc_edge.errors import UsageError
from musc_edge.images import DEFAULT_MAX_PIXELS
from musc_edge.precision import Precision

console = Console(soft_wrap=True)  # long paths stay whole in logs, whatever the width


class Mode(str, enum.Enum):
    batch = "batch"
    rolling = "rolling"


class MapNorm(str, enum.Enum):
    batch = "batch"
    image = "image"


def default_out(camera_dir: Path) -> Path:
    """CAMERA_DIR-musc-results beside the camera folder: outside it, so never watched."""
    camera_dir = camera_dir.resolve()
    return camera_dir.parent / f"{camera_dir.name}-musc-results"


def parse_threshold(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise typer.BadParameter(f"--threshold takes a number or auto, got {text!r}") from None


def run(
    ctx: typer.Context,
    camera_dir: Path | None = typer.Option(
        None, "--camera-dir", help="Folder the camera writes into (required here or in --config)."
    ),
    model: Path | None = typer.Option(
        None, "--model", help="Model package (musc-edge export; required here or in --config)."
    ),
    config: Path | None = typer.Option(
        None,
        "--config",
        help="Line config (YAML): any of these options and the sinks; flags given here win.",
    ),
    batch_size: int = typer.Option(
        32,
        "--batch-size",
        min=1,
        help="Images scored together (rolling: the window of references).",
    ),
    mode: Mode = typer.Option(
        Mode.batch, "--mode", help="batch: score full batches; rolling: each image on arrival."
    ),
    watch: bool = typer.Option(
        True, "--watch/--once", help="Keep watching for new files, or score what is there."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Results folder (default: CAMERA_DIR-musc-results beside it)."
    ),
    engine: options.Engine = options.EngineOpt,
    backbone_precision: Precision | None = options.BackbonePrecision,
    msm_precision: Precision | None = typer.Option(
        None,
        "--msm-precision",
        help="Precision of MSM's similarity products: fp32, bf16, fp16 (default: the package's).",
    ),
    window: int | None = options.Window,
    threshold: str = typer.Option(
        "auto",
        "--threshold",
        help="Score above which a part is anomalous, or auto: the calibration's, else the "
        "line's history.",
    ),
    calibration: Path | None = typer.Option(
        None, "--calibration", help="Known-good parts from `musc-edge calibrate` (recommended)."
    ),
    refresh_references: int = typer.Option(
        0,
        "--refresh-references",
        min=0,
        help="Calibrated: let up to N recent clearly-normal parts join the references (drift).",
    ),
    map_norm: MapNorm = typer.Option(
        MapNorm.batch, "--map-norm", help="Heatmaps scaled over the batch or per image."
    ),
    overlap: bool | None = typer.Option(
        None,
        "--overlap/--no-overlap",
        help="Batch mode: extract the next images while a batch is scored (default: with a GPU "
        "or more than one core).",
    ),
    poll: float = typer.Option(0.5, "--poll", min=0.01, help="Seconds between folder scans."),
    settle: float = typer.Option(
        1.0, "--settle", min=0, help="Seconds a file must stay unchanged before it is read."
    ),
    decode_timeout: float = typer.Option(
        10.0, "--decode-timeout", min=0, help="Seconds an undecodable file waits to be an error."
    ),
    max_wait: float = typer.Option(
        60.0, "--max-wait", min=0, help="Watch, batch mode: score a partial batch this old (s)."
    ),
    allow_random_init: bool = typer.Option(
        False, "--allow-random-init", help="Torch engine: accept a random-weights package (tests)."
    ),
    max_pixels: int = typer.Option(
        DEFAULT_MAX_PIXELS, "--max-pixels", min=1, help="Refuse images declaring more pixels."
    ),
    ignore: list[str] = typer.Option(
        [],
        "--ignore",
        help="Glob of camera paths never scored, relative to the camera folder (repeatable), "
        "e.g. 'done/*' for an archive subfolder.",
    ),
    sink: list[str] = typer.Option(
        [],
        "--sink",
        help="Extra result sink, NAME or NAME:KEY=VALUE,... (repeatable): mqtt, webhook, opcua.",
    ),
    serve: str | None = typer.Option(
        None, "--serve", help="Live view in the browser at HOST:PORT (e.g. 127.0.0.1:8765)."
    ),
    allow_remote: bool = typer.Option(
        False, "--allow-remote", help="Let --serve listen on other interfaces than localhost."
    ),
) -> None:
    """Watch a camera folder; write scores, overlays and masks as images arrive.

    OUT holds results.jsonl (the source of truth, resumed after a crash or restart),
    results.csv, batches/ (manifests, overlays, masks) and rejected/ (copies of files that
    could not be scored; the originals stay). See docs/runtime.md and docs/deployment.md.
    """
    # signals are taken from the start: a stop while the model loads ends the run cleanly
    with stop_on_signals() as stop, user_errors():
        values, sinks = line_values(ctx, config)
        run_line(values, sinks, stop)


def line_values(ctx: typer.Context, config: Path | None) -> tuple[dict, dict]:
    """The run's options (the flags over the line config) and its extra sinks by name."""
    from musc_edge.runtime.sinks import parse_sink_spec

    values, sinks = dict(ctx.params), {}
    if config is not None:
        values, sinks = merge_line_config(ctx, config)
    for text in values["sink"]:
        name, given = parse_sink_spec(text)
        sinks[name] = {**sinks.get(name, {}), **given}  # a flag's options win over the file's
    for required in ("camera_dir", "model"):
        if values[required] is None:
            flag = "--" + required.replace("_", "-")
            raise UsageError(f"{flag} is required (on the command line or in a --config file)")
    return values, sinks


def run_line(values: dict, sinks: dict, stop: threading.Event) -> None:
    """Load the package, open the line (and the live view), and run until stopped."""
    from musc_edge.musc import MuSc
    from musc_edge.package import load_package
    from musc_edge.runtime.line import Line, LineSettings
    from musc_edge.runtime.runners import open_runner

    camera_dir = Path(values["camera_dir"])
    out_dir = Path(values["out"] or default_out(camera_dir))
    mode = Mode(values["mode"])
    settings = LineSettings(
        camera_dir=camera_dir,
        out_dir=out_dir,
        batch_size=values["batch_size"],
        mode=mode.value,
        watch=values["watch"],
        threshold=parse_threshold(values["threshold"]),
        map_norm=MapNorm(values["map_norm"]).value,
        poll=values["poll"],
        settle=values["settle"],
        decode_timeout=values["decode_timeout"],
        max_wait=values["max_wait"] or None,
        sinks=sinks,
        max_pixels=values["max_pixels"],
        calibration=values["calibration"],
        refresh_references=values["refresh_references"],
        overlap=values["overlap"],
        ignore=tuple(values["ignore"]),
    )
    model = Path(values["model"])
    console.print(f"loading {model} ...")
    package = load_package(model)
    engine = options.Engine(values["engine"]).value
    runner = open_runner(package, engine, values["allow_random_init"], values["backbone_precision"])
    precision = values["msm_precision"] and Precision(values["msm_precision"])
    musc = MuSc.from_settings(package.musc, precision, window=values["window"])
    with live_view(out_dir, values["serve"], values["allow_remote"]):
        line = Line(settings, package, runner, musc)
        console.print(
            f"[bold]musc-edge run[/] {camera_dir} -> {out_dir}\n"
            f"model {package.folder} ({package.backbone} at {package.image_size}px), "
            f"engine {runner.description}, {mode.value} mode, batch {settings.batch_size}, "
            f"{musc.precision.value}"
            + ("" if musc.window is None else f", positional MSM, window {musc.window}")
            + f"\n{verdict_basis(line)}"
        )
        if line.stats.resumed or line.stats.dropped:
            dropped = line.stats.dropped
            console.print(
                f"resuming: {line.stats.resumed} files already answered"
                + (f", {dropped} torn result line(s) dropped" if dropped else "")
            )
        with Live(console=console, transient=True) as live:
            shown = 0.0

            def show(stats) -> None:
                nonlocal shown
                if time.monotonic() - shown > 0.25:
                    live.update(status_line(stats))
                    shown = time.monotonic()

            line.on_update = show
            stats = line.run(stop)
    console.print(status_line(stats))
    console.print(f"results: {out_dir / 'results.jsonl'} and results.csv")


@contextlib.contextmanager
def live_view(out_dir: Path, address: str | None, allow_remote: bool) -> Iterator[None]:
    """--serve HOST:PORT: the browser view of the out folder while the line runs (it only
    reads the folder, so it starts before the line and stops after it)."""
    if address is None:
        yield
        return
    from musc_edge.runtime.view import serve

    host, port = parse_address(address)
    server = serve(out_dir, host, port, allow_remote)
    console.print(f"live view: {server.url}")
    try:
        yield
    finally:
        server.stop()


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets: [::1]:8765) -> host and port."""
    host, colon, port = text.rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--serve takes HOST:PORT, e.g. 127.0.0.1:8765; got {text!r}")
    return host, int(port)


def verdict_basis(line) -> str:
    """Where the threshold comes from, said once at start; uncalibrated is said loudly."""
    basis = line.judge.basis
    if basis == "calibration":
        known = line.known_good
        return (
            f"calibrated: {len(known)} known-good parts, threshold "
            f"{known.calibration.threshold:.4f} ({100 * known.calibration.target_frr:g} % "
            "false rejects expected)"
        )
    if basis == "fixed":
        return f"threshold {line.judge.value} (fixed by --threshold; not calibrated)"
    return (
        "[bold yellow]UNCALIBRATED[/]: the threshold comes from this line's own history; "
        "run `musc-edge calibrate` with known-good parts for verdicts you can trust"
    )


def status_line(stats) -> str:
    """Images seen, scored, anomalous, failed, pending, flags and latencies, on one line."""
    parts = [
        f"batches {stats.batches}",
        f"seen {stats.seen}",
        f"scored {stats.scored}",
        f"anomalous {stats.anomalous}",
        f"failed {stats.failed}",
        f"pending {stats.pending}",
    ]
    if not stats.calibrated:
        parts.append("uncalibrated")
    if stats.threshold is not None:
        parts.append(f"threshold {stats.threshold:.4f}")
    if stats.unjudged:
        parts.append(f"UNJUDGED {stats.unjudged}")
    if stats.problem:
        parts.append(stats.problem)
    if stats.shifts:
        parts.append(f"SHIFT in {stats.shifts} commit(s)")
    if stats.repeated:
        parts.append(f"REPEATED defect on {stats.repeated} part(s)")
    if stats.joined:
        parts.append(f"{stats.joined} joined the references")
    if stats.last_batch_ms is not None:
        parts.append(f"last batch latency {stats.last_batch_ms:.0f} ms")
    if stats.image_ms:
        parts.append(f"median image latency {statistics.median(stats.image_ms):.0f} ms")
    return " | ".join(parts)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """Ctrl-C or SIGTERM asks the line to finish the batch in hand; a second one aborts."""
    stop = threading.Event()

    def request_stop(signum, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        console.print("stopping: finishing the batch in hand (again to abort) ...")
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
