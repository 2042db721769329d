"""`musc-edge run`: score the images a camera writes into a folder, as they arrive."""

from __future__ import annotations

import contextlib
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.live import Live

from musc_edge.cli import options
from musc_edge.cli.errors import user_errors
from musc_edge.cli.line_config import GIVEN, NOT_SETTINGS, read_config_values
from musc_edge.errors import UsageError
from musc_edge.precision import Precision
from musc_edge.runtime.settings import (
    ALIASES,
    Engine,
    MapNorm,
    Mode,
    RunSettings,
    default_of,
    load_settings,
)

if TYPE_CHECKING:
    from musc_edge.runtime.backends import Backend

console = Console(soft_wrap=True)  # long paths stay whole in logs, whatever the width


def flag(name: str) -> str:
    """The command-line spelling of a setting."""
    spelled = {"out_dir": "--out", "watch": "--watch/--once", "items": "--item"}
    return spelled.get(name, "--" + name.replace("_", "-"))


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
        default_of("batch_size"),
        "--batch-size",
        help="Images scored together (rolling: the window of references).",
    ),
    mode: Mode = typer.Option(
        default_of("mode"),
        "--mode",
        help="batch: score full batches; rolling: each image on arrival.",
    ),
    watch: bool = typer.Option(
        default_of("watch"),
        "--watch/--once",
        help="Keep watching for new files, or score what is there.",
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Results folder (default: CAMERA_DIR-musc-results beside it)."
    ),
    engine: Engine = options.EngineOpt,
    backbone_precision: Precision | None = options.BackbonePrecision,
    msm_precision: Precision | None = typer.Option(
        None,
        "--msm-precision",
        help="Precision of MSM's similarity products: fp32, bf16, fp16 (default: the package's).",
    ),
    window: int | None = options.Window,
    threshold: str = typer.Option(
        "auto",  # the model's None
        "--threshold",
        help="Score above which a part is anomalous, or auto: the calibration's, else the "
        "line's history.",
    ),
    calibration: Path | None = typer.Option(
        None, "--calibration", help="Known-good parts from `musc-edge calibrate` (recommended)."
    ),
    refresh_references: int = typer.Option(
        default_of("refresh_references"),
        "--refresh-references",
        help="Calibrated: let up to N recent clearly-normal parts join the references (drift).",
    ),
    mutual: bool = typer.Option(
        default_of("mutual"),
        "--mutual",
        help="Calibrated: also score each part mutually with its batch or window (MuSc's MSM "
        "and RsCIN); by default a calibrated part is judged by its known-good parts alone, on "
        "arrival.",
    ),
    map_norm: MapNorm = typer.Option(
        default_of("map_norm"),
        "--map-norm",
        help="Heatmaps scaled over the batch (calibrated and judged alone: on the "
        "calibration's scale) or per image.",
    ),
    overlap: bool | None = typer.Option(
        default_of("overlap"),
        "--overlap/--no-overlap",
        help="Batch mode: extract the next images while a batch is scored (default: with a GPU "
        "or more than one core).",
    ),
    poll: float = typer.Option(default_of("poll"), "--poll", help="Seconds between folder scans."),
    settle: float = typer.Option(
        default_of("settle"),
        "--settle",
        help="Seconds a file must stay unchanged before it is read.",
    ),
    decode_timeout: float = typer.Option(
        default_of("decode_timeout"),
        "--decode-timeout",
        help="Seconds an undecodable file waits to be an error.",
    ),
    max_wait: float = typer.Option(
        default_of("max_wait"),
        "--max-wait",
        help="Watch: answer a part waiting this long, in a partial batch or the rolling "
        "warm-up (s; 0: never).",
    ),
    allow_random_init: bool = typer.Option(
        default_of("allow_random_init"),
        "--allow-random-init",
        help="Torch engine: accept a random-weights package (tests).",
    ),
    max_pixels: int = typer.Option(
        default_of("max_pixels"), "--max-pixels", help="Refuse images declaring more pixels."
    ),
    region: str | None = typer.Option(
        None,
        "--region",
        help="Score only this box of each image, x,y,width,height in pixels (the part, not "
        "the fixture); calibrate with the same --region.",
    ),
    item: list[str] = typer.Option(
        [],
        "--item",
        help="An inspection item, NAME:X,Y,WIDTH,HEIGHT[:CALIBRATION] (repeatable): each box "
        "judged on its own; the image's verdict is the worst item's (or items: in --config).",
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
        default_of("allow_remote"),
        "--allow-remote",
        help="Let --serve listen on other interfaces than localhost.",
    ),
    remote: str | None = typer.Option(
        None,
        "--remote",
        help="URL of the plant's scoring service (musc-edge serve): it scores, this station "
        "keeps the camera, journal and sinks.",
    ),
    line: str | None = typer.Option(
        None, "--line", help="With --remote: this station's line in the service's plant.yaml."
    ),
    remote_timeout: float = typer.Option(
        default_of("remote_timeout"),
        "--remote-timeout",
        help="With --remote: seconds a batch may take before the service counts as down.",
    ),
) -> None:
    """Watch a camera folder; write scores, overlays and masks as images arrive.

    OUT holds results.jsonl (the source of truth, resumed after a crash or restart),
    results.csv, batches/ (manifests, overlays, masks) and rejected/ (copies of files that
    could not be scored; the originals stay). See docs/runtime.md and docs/deployment.md.
    """
    # signals are taken from the start: a stop while the model loads ends the run cleanly
    with stop_on_signals() as stop, user_errors():
        run_line(line_settings(ctx, config), stop)


def line_settings(ctx: typer.Context, config: Path | None) -> RunSettings:
    """The run's settings: the line config's values, the flags given over them, validated
    by the one settings model (runtime/settings.py)."""
    from musc_edge.runtime.sinks import parse_sink_spec

    values, sinks, source = {}, {}, {}
    if config is not None:
        values, sinks = read_config_values(config)
        source = {name: f"{config}: {name}" for name in values}
    for name, value in ctx.params.items():
        source_of_value = ctx.get_parameter_source(name)
        if name in NOT_SETTINGS or source_of_value is None or source_of_value.name not in GIVEN:
            continue  # a default: the model has it
        setting = ALIASES.get(name, name)
        values[setting], source[setting] = value, flag(setting)
    for text in ctx.params["sink"]:
        name, given = parse_sink_spec(text)
        sinks[name] = {**sinks.get(name, {}), **given}  # a flag's options win over the file's
    return load_settings({**values, "sinks": sinks}, source)


def run_line(settings: RunSettings, stop: threading.Event) -> None:
    """Open the line's backend (the package here, or the plant's scoring service), the line
    and the live view, and run until stopped."""
    from musc_edge.runtime.line import Line

    backend, described = (station_backend if settings.remote else local_backend)(settings)
    with live_view(settings.out_dir, settings.serve, settings.allow_remote):
        line = Line(settings, backend)
        console.print(
            f"[bold]musc-edge run[/] {settings.camera_dir} -> {settings.out_dir}\n"
            f"{described}, {scoring_mode(settings)}, batch {settings.batch_size}"
            f"\n{verdict_basis(line)}"
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
    console.print(f"results: {settings.out_dir / 'results.jsonl'} and results.csv")


def scoring_mode(settings: RunSettings) -> str:
    """How parts are scored, for the start-up message."""
    if settings.judged_alone and not settings.remote:
        return "each part on arrival against its known-good parts (no --mutual)"
    return f"{settings.mode.value} mode"


def local_backend(settings: RunSettings) -> tuple[Backend, str]:
    """The package's runner and MuSc on this device, and what the start-up message says."""
    from musc_edge.musc import MuSc
    from musc_edge.package import load_package
    from musc_edge.runtime.backends import LocalBackend
    from musc_edge.runtime.runners import open_runner

    console.print(f"loading {settings.model} ...")
    package = load_package(settings.model)
    runner = open_runner(
        package,
        Engine(settings.engine).value,
        settings.backbone_precision,
        allow_random_init=settings.allow_random_init,
    )
    musc = MuSc.for_package(package, settings.msm_precision, window=settings.window)
    described = (
        f"model {package.folder} ({package.backbone} at {package.image_size}px), "
        f"engine {runner.description}, {musc.precision.value}"
        + ("" if musc.window is None else f", positional MSM, window {musc.window}")
    )
    return LocalBackend(package, runner, musc), described


def station_backend(settings: RunSettings) -> tuple[Backend, str]:
    """The plant's scoring service scores this line (runtime/remote.py)."""
    from musc_edge.runtime.remote import RemoteBackend, ServiceClient, line_spec

    client = ServiceClient(settings.remote, settings.line, settings.remote_timeout)
    spec, problem = line_spec(client, settings.out_dir)
    if problem:
        console.print(
            f"[yellow]the scoring service does not answer ({problem}); the parts wait "
            "until it does[/]"
        )
    backend = RemoteBackend(client, spec)
    size = backend.preprocess.image_size.to_json()
    described = f"line {spec.line} scored by {client.url} ({spec.backbone} at {size}px)"
    return backend, described


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
    lines = []
    for inspection in line.inspections:
        text = inspection.verdicts.describe()
        text = text if inspection.name is None else f"item {inspection.name}: {text}"
        lines.append(text if inspection.verdicts.calibrated else f"[bold yellow]{text}[/]")
    return "\n".join(lines)


def status_line(stats) -> str:
    """Images seen, scored, anomalous, failed, pending, flags and latencies, on one line."""
    counts = stats.counts
    parts = [
        f"batches {stats.batches}",
        f"seen {stats.seen}",
        f"scored {counts.scored}",
        f"anomalous {counts.anomalous}",
        f"failed {counts.failed}",
        f"pending {stats.pending}",
    ]
    if not stats.calibrated:
        parts.append("uncalibrated")
    if stats.threshold is not None:
        parts.append(f"threshold {stats.threshold:.4f}")
    if counts.unjudged:
        parts.append(f"UNJUDGED {counts.unjudged}")
    if stats.problem:
        parts.append(stats.problem)
    if counts.shift_commits:
        parts.append(f"SHIFT in {counts.shift_commits} commit(s)")
    if counts.repeated:
        parts.append(f"REPEATED defect on {counts.repeated} part(s)")
    if counts.items_anomalous:
        per_item = ", ".join(f"{name} {count}" for name, count in counts.items_anomalous.items())
        parts.append(f"anomalous items: {per_item}")
    if counts.joined:
        parts.append(f"{counts.joined} joined the references")
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
