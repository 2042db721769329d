"""`musc-edge bench`: per-stage latency of a model package, batch-size sweeps, and the
original MuSc approach side by side."""

from __future__ import annotations

import csv
import platform
import tempfile
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from musc_edge.cli import options
from musc_edge.cli.errors import user_errors
from musc_edge.cli.options import parse_int_list
from musc_edge.precision import Precision

app = typer.Typer(rich_markup_mode=None, help="Latency benchmarks.", no_args_is_help=False)
console = Console(soft_wrap=True)  # long paths stay whole in logs, whatever the width


@app.callback(invoke_without_command=True)
def bench(
    ctx: typer.Context,
    model: Path | None = typer.Option(None, "--model", "-m", help="Model package folder."),
    engine: options.Engine = options.EngineOpt,
    backbone_precision: Precision | None = options.BackbonePrecision,
    msm_precision: Precision = typer.Option(
        Precision.fp32, "--msm-precision", help="Precision of MSM's similarity products."
    ),
    batch_size: int = typer.Option(32, "--batch-size", "-n", help="Images per MuSc batch."),
    images: Path | None = typer.Option(None, "--images", help="Folder of images to time on."),
    synthetic: bool = typer.Option(False, "--synthetic", help="Generated images instead."),
    runs: int = typer.Option(5, "--runs", min=1, help="Timed runs per setting."),
    warmup: int = typer.Option(1, "--warmup", min=0, help="Untimed runs first."),
    sweep: str | None = typer.Option(None, "--sweep", help="Batch sizes, e.g. 8,16,32,64."),
    compare_original: bool = typer.Option(
        False, "--compare-original", help="Also run the original approach on the same images."
    ),
    calibration: Path | None = typer.Option(
        None, "--calibration", help="Time with these known-good parts joining every batch."
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Write all figures as JSON."),
    csv_out: Path | None = typer.Option(None, "--csv", help="Write one row per stage as CSV."),
    plot: Path | None = typer.Option(None, "--plot", help="PNG of latency per image vs N."),
) -> None:
    """Time decode, backbone, LNAMD, MSM, RsCIN and writing for a model package."""
    if ctx.invoked_subcommand is not None:
        return
    from musc_edge.bench.pipelines import line_pipeline, original_pipeline
    from musc_edge.bench.stages import agreement, batch_paths, measure, speedups
    from musc_edge.package import load_package

    if model is None:
        raise typer.BadParameter("--model is required (a folder written by musc-edge export)")
    if (images is None) == (not synthetic):
        raise typer.BadParameter("give exactly one of --images DIR and --synthetic")
    if calibration is not None and compare_original:
        raise typer.BadParameter(
            "--compare-original compares the zero-shot pipelines; run it without --calibration"
        )
    sizes = list(parse_int_list(sweep, "--sweep")) if sweep else [batch_size]
    with user_errors(), tempfile.TemporaryDirectory() as work:
        package = load_package(model)
        folder = images or write_synthetic(Path(work), max(sizes), max(package.size.hw))
        ours = line_pipeline(package, engine.value, backbone_precision, msm_precision.value)
        if calibration is not None:
            from musc_edge.calibration import load_calibration

            known = load_calibration(calibration, package)
            ours.known_good = known.references(ours.musc.precision.dtype)
        original = original_pipeline(package) if compare_original else None
        tolerance_basis = loosest(msm_precision, ours.extractor.precision)
        console.print(
            f"[bold]{package.backbone}[/] {package.image_size}px, engine "
            f"{ours.name}, backbone {ours.extractor.precision.value}, MSM {msm_precision.value}, "
            f"{platform.node()}"
        )
        report = {
            "model": str(model),
            "engine": ours.name,
            "backbone_precision": ours.extractor.precision.value,
            "msm_precision": msm_precision.value,
            "calibration": str(calibration) if calibration else None,
            "environment": environment(),
            "results": [],
        }
        per_setting = runs + warmup
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("benchmark", total=len(sizes) * per_setting * (1 + bool(original)))
            for size in sizes:
                paths, repeated = batch_paths(folder, size)
                if repeated:
                    console.print(f"[yellow]note[/]: fewer than {size} images; repeated in order")
                entry: dict = {}
                mine, mine_out = measure(ours, paths, runs, warmup, lambda: bar.advance(task))
                entry["ours"] = mine.summary()
                if original is not None:
                    orig, orig_out = measure(
                        original, paths, runs, warmup, lambda: bar.advance(task)
                    )
                    entry["original"] = orig.summary()
                    entry["agreement"] = agreement(mine_out, orig_out, tolerance_basis)
                    if entry["agreement"]["agree"]:
                        entry["speedup"] = speedups(entry["ours"], entry["original"])
                report["results"].append(entry)
    print_report(report)
    if json_out:
        from musc_edge.files import write_json_atomic

        write_json_atomic(json_out, report)
    if csv_out:
        write_csv(csv_out, report)
    if plot:
        plot_sweep(plot, report)


def loosest(*precisions: Precision) -> str:
    """The precision whose agreement tolerance applies when stages run at different ones."""
    from musc_edge.bench.stages import TOLERANCE

    return max((p.value for p in precisions), key=TOLERANCE.__getitem__)


def write_synthetic(folder: Path, count: int, size: int) -> Path:
    from musc_edge.bench.synthetic import write_parts

    write_parts(folder / "images", count, size)
    return folder / "images"


def environment() -> dict:
    """Device and library versions, so a number can be traced to what produced it."""
    import torch

    from musc_edge import __version__

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    return {
        "device": device or platform.machine(),
        "host": platform.node(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "musc_edge": __version__,
    }


def print_report(report: dict) -> None:
    """Per-stage medians for each batch size, with the original and ratios beside them."""
    for entry in report["results"]:
        ours = entry["ours"]
        table = Table(
            title=f"N = {ours['batch_size']}  ({ours['images_per_s']:.1f} images/s, "
            f"peak host {ours['peak_host_mib']:.0f} MiB)"
        )
        table.add_column("stage")
        for column in ("median s", "p95 s", "max s", "ms/image"):
            table.add_column(column, justify="right")
        if "original" in entry:
            table.add_column("original s", justify="right")
        for stage, figures in ours["stages"].items():
            cells = [
                f"{figures['median_s']:.3f}",
                f"{figures['p95_s']:.3f}",
                f"{figures['max_s']:.3f}",
                f"{figures['median_per_image_ms']:.1f}",
            ]
            if "original" in entry:
                cells.append(f"{entry['original']['stages'][stage]['median_s']:.3f}")
            table.add_row(stage, *cells)
        console.print(table)
        if "agreement" in entry:
            agree = entry["agreement"]
            console.print(
                f"max map diff {agree['max_map_diff']:.2e}, max score diff "
                f"{agree['max_score_diff']:.2e} (tolerance {agree['tolerance']:.0e})"
            )
            if "speedup" in entry:
                ratios = ", ".join(f"{k} {v:.1f}x" for k, v in entry["speedup"].items())
                console.print(f"speed-up over the original: {ratios}")
            else:
                console.print("[red]outputs differ beyond tolerance: no speed-up is claimed[/]")


def write_csv(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["pipeline", "batch_size", "stage", "median_s", "p95_s", "max_s", "median_per_image_ms"]
        )
        for entry in report["results"]:
            for key in ("ours", "original"):
                if key in entry:
                    run = entry[key]
                    for stage, f in run["stages"].items():
                        writer.writerow(
                            [
                                run["pipeline"],
                                run["batch_size"],
                                stage,
                                f["median_s"],
                                f["p95_s"],
                                f["max_s"],
                                f["median_per_image_ms"],
                            ]
                        )


def plot_sweep(path: Path, report: dict) -> None:
    """Latency per image against batch size, total and MSM, for each pipeline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for key in ("ours", "original"):
        rows = [entry[key] for entry in report["results"] if key in entry]
        if not rows:
            continue
        sizes = [row["batch_size"] for row in rows]
        for stage, style in (("total", "-o"), ("msm", "--s")):
            axis.plot(
                sizes,
                [row["stages"][stage]["median_per_image_ms"] for row in rows],
                style,
                label=f"{rows[0]['pipeline']} {stage}",
            )
    axis.set_xlabel("batch size N")
    axis.set_ylabel("median latency per image (ms)")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
