"""`musc-edge export` (workstation) and `musc-edge engine build` (device)."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from musc_edge.cli import options
from musc_edge.cli.errors import user_errors
from musc_edge.runtime.engine_builder import EnginePrecision

console = Console(soft_wrap=True)  # long paths stay whole in logs, whatever the width
engine_app = typer.Typer(
    rich_markup_mode=None, help="TensorRT engines of model packages.", no_args_is_help=True
)

PRECISION_HELP = "TensorRT engine precision (fp16 keeps LayerNorm in fp32)."
MAX_BATCH_HELP = "Largest batch the TensorRT engine takes."


class Stages:
    """Progress of a long job: a spinner on the stage under way, a tick and the seconds
    taken for each stage done."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task = None
        self.stage = ""
        self.started = 0.0

    def __call__(self, stage: str) -> None:
        self.finish()
        self.task = self.progress.add_task(stage)
        self.stage = stage
        self.started = time.perf_counter()

    def finish(self) -> None:
        if self.task is None:
            return
        self.progress.remove_task(self.task)
        took = time.perf_counter() - self.started
        self.progress.console.print(f"[green]✓[/] {self.stage} [dim]{took:.1f} s[/]")
        self.task = None


def stage_progress() -> Progress:
    return Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
    )


def export(
    preset: str | None = options.Preset,
    backbone: str | None = options.Backbone,
    image_size: str | None = options.ImageSizeOption,
    layers: str | None = options.Layers,
    weights: Path | None = options.Weights,
    pretrained: str | None = options.Pretrained,
    random_init: bool = options.RandomInit,
    engine_precision: EnginePrecision = typer.Option(
        EnginePrecision.fp16, "--engine-precision", help=PRECISION_HELP
    ),
    max_batch: int = typer.Option(8, "--max-batch", min=1, help=MAX_BATCH_HELP),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Package folder (default packages/BACKBONE-SIZE)."
    ),
    parity_images: Path | None = typer.Option(
        None,
        "--parity-images",
        help="Folder of real images for the parity check, 4 taken (default: generated images).",
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing package."),
) -> None:
    """Export a backbone to a model package for the runtime.

    Writes the ONNX graph, the TensorRT engine where TensorRT and a GPU are present, the
    musc.json manifest and parity.json, all in a staging folder renamed into place at the end.
    """
    from musc_edge.export.exporter import default_folder, export_package
    from musc_edge.export.staging import check_replaceable

    started = time.perf_counter()
    with user_errors():
        config = options.build_config(preset, backbone, image_size, layers, None)
        folder = out or default_folder(config.backbone, config.image_size)
        check_replaceable(folder, force)  # before minutes of work, not after
        with stage_progress() as progress:
            stages = Stages(progress)
            stages(f"building {config.backbone} at {config.image_size}px")
            model = options.build_backbone(config, weights, pretrained, random_init)
            result = export_package(
                model,
                folder,
                musc_settings=config.musc_settings(),
                precision=engine_precision.value,
                max_batch=max_batch,
                parity_dir=parity_images,
                force=force,
                on_stage=stages,
            )
            stages.finish()
    package = result.package
    console.print(
        f"[bold]{folder}[/]: {package.backbone} ({package.weights_source}), "
        f"{package.image_size}px, blocks {package.layers}, "
        f"in {time.perf_counter() - started:.0f} s, peak memory {peak_memory_gib():.1f} GiB"
    )
    for name, info in package.artifacts.items():
        console.print(f"  {name:24s} {info['bytes'] / 1e6:10.1f} MB")
    print_parity(result.parity)
    if result.engine_skipped:
        console.print(
            f"[yellow]TensorRT engine skipped[/]: {escape(result.engine_skipped)}. Build it on the "
            f"device: musc-edge engine build --model {folder}"
        )


@engine_app.command("build")
def build(
    model: Path = typer.Option(..., "--model", help="Model package folder (musc-edge export)."),
    engine_precision: EnginePrecision | None = typer.Option(
        None, "--engine-precision", help=PRECISION_HELP + " (default: the package's)"
    ),
    max_batch: int | None = typer.Option(
        None, "--max-batch", min=1, help=MAX_BATCH_HELP + " (default: the package's)"
    ),
    force: bool = typer.Option(False, "--force", help="Rebuild an existing engine."),
) -> None:
    """Build (or rebuild) the package's TensorRT engine on this device from its ONNX graph.

    Precision and max batch default to the package's; musc.json is updated atomically.
    """
    from musc_edge.package import ENGINE_FILE, load_package
    from musc_edge.runtime.engine_builder import (
        EngineBuildError,
        build_package_engine,
        engine_support,
    )

    with user_errors():
        reason = engine_support()
        if reason:
            raise EngineBuildError(f"cannot build an engine here: {reason}")
        package = load_package(model, skip={ENGINE_FILE})
        if package.engine and not force:
            raise FileExistsError(
                f"{model} already has an engine (built for {package.engine.get('gpu')}, "
                f"TensorRT {package.engine.get('tensorrt')}); pass --force to rebuild it"
            )
        with stage_progress() as progress:
            stages = Stages(progress)
            parity = build_package_engine(
                package,
                engine_precision.value if engine_precision else package.precision,
                max_batch or package.max_batch,
                stages,
            )
            stages.finish()
    print_parity({"tensorrt": parity})
    console.print(f"{package.path(ENGINE_FILE)}: built for {package.engine['gpu']}")


def print_parity(report: dict) -> None:
    """One row per runner and output: errors against the torch model, and the verdict."""
    table = Table("runner", "output", "max abs", "max rel", "tolerance", "")
    for runner in ("onnxruntime", "tensorrt"):
        entry = report.get(runner) or {}
        for output, errors in entry.get("outputs", {}).items():
            table.add_row(
                runner,
                output,
                f"{errors['max_abs']:.2e}",
                f"{errors['max_rel']:.2e}",
                f"{entry['tolerance']:.0e}",
                "[green]ok[/]" if errors["max_rel"] <= entry["tolerance"] else "[red]over[/]",
            )
    console.print(table)


def peak_memory_gib() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
