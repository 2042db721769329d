"""`musc-edge eval`: metrics on MVTec-style test sets, as the MuSc paper reports them."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from musc_edge.cli import options
from musc_edge.cli.errors import user_errors
from musc_edge.precision import Precision

console = Console(soft_wrap=True)  # long paths stay whole in logs, whatever the width


def evaluate(
    root: Path = typer.Option(..., "--root", help="Dataset root folder."),
    dataset: str = typer.Option("mvtec", "--dataset", help="mvtec, visa, btad or folder."),
    category: str = typer.Option("all", "--category", "-c", help="A category, or all."),
    json_out: Path | None = typer.Option(None, "--json", help="Write metrics and scores here."),
    save_maps: Path | None = typer.Option(None, "--save-maps", help="Write heatmap PNGs here."),
    preset: str | None = options.Preset,
    backbone: str | None = options.Backbone,
    image_size: int | None = options.ImageSize,
    layers: str | None = options.Layers,
    msm_precision: Precision | None = options.MsmPrecision,
    weights: Path | None = options.Weights,
    pretrained: str | None = options.Pretrained,
    random_init: bool = options.RandomInit,
    device: str = options.Device,
) -> None:
    """Score each category's test images as one unlabeled batch and report the metrics."""
    from musc_edge.datasets import list_categories, load_samples
    from musc_edge.evaluate import evaluate_category, mean_metrics
    from musc_edge.features import torch_extractor
    from musc_edge.files import write_json_atomic
    from musc_edge.musc import MuSc

    started = time.perf_counter()
    with user_errors():
        config = options.build_config(preset, backbone, image_size, layers, msm_precision)
        categories = list_categories(dataset, root) if category == "all" else [category]
        samples = {name: load_samples(dataset, root, name) for name in categories}
        model = options.build_backbone(config, weights, pretrained, random_init)
        extractor = torch_extractor(model, options.resolve_device(device))
        musc = MuSc(config.r_list, config.frac, config.k_list, config.precision)
        console.print(
            f"[bold]{dataset}[/] {', '.join(categories)}: {config.backbone} at "
            f"{config.image_size}px, blocks {list(model.layers)}, {config.precision}, "
            f"weights {model.weights.source}"
        )
        reports = []
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as bar:
            for name in categories:
                task = bar.add_task(name, total=None)

                def show(stage: str, done: int, total: int, task=task, name=name) -> None:
                    bar.update(task, description=f"{name}: {stage}", completed=done, total=total)

                reports.append(
                    evaluate_category(
                        name, samples[name], model.preprocess, extractor, musc, show, save_maps
                    )
                )
    print_table(reports)
    for report in reports:
        for failure in report.failures:
            console.print(f"[yellow]skipped[/] {failure['file']}: {failure['error']}")
    elapsed = time.perf_counter() - started
    console.print(f"done in {elapsed:.1f} s")
    if json_out:
        payload = {
            "config": {
                **config.to_dict(),
                "layers": list(model.layers),
                "dataset": dataset,
                "weights": asdict(model.weights),
            },
            "categories": {r.category: asdict(r) for r in reports},
            "mean": mean_metrics(reports),
            "seconds": elapsed,
        }
        write_json_atomic(json_out, payload)
        console.print(f"results written to {json_out}")


def print_table(reports) -> None:
    """One row per category, metrics in percent, as in the paper's tables."""
    table = Table(
        "category",
        "img AUROC",
        "img F1",
        "img AP",
        "px AUROC",
        "px F1",
        "px AP",
        "PRO",
        "images",
        "time s",
    )
    for r in reports:
        px = r.pixel or {}
        cells = [
            r.image["auroc"],
            r.image["f1_max"],
            r.image["ap"],
            *(px.get(k) for k in ("auroc", "f1_max", "ap", "pro")),
        ]
        table.add_row(
            r.category,
            *("-" if v is None else f"{v:.2f}" for v in cells),
            str(len(r.images)),
            f"{r.seconds:.1f}",
        )
    console.print(table)
