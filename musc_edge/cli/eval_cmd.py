"""`musc-edge eval`: metrics on MVTec-style test sets, as the MuSc paper reports them."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from musc_edge.cli import options
from musc_edge.cli.errors import user_errors
from musc_edge.cli.progress import progress_bar
from musc_edge.precision import Precision

console = Console(soft_wrap=True)  # long paths stay whole in logs, whatever the width


def evaluate(
    root: Path = typer.Option(..., "--root", help="Dataset root folder."),
    dataset: str = typer.Option("mvtec", "--dataset", help="mvtec, visa, btad or folder."),
    category: str = typer.Option("all", "--category", "-c", help="A category, or all."),
    json_out: Path | None = typer.Option(None, "--json", help="Write metrics and scores here."),
    save_maps: Path | None = typer.Option(None, "--save-maps", help="Write heatmap PNGs here."),
    shots: str | None = typer.Option(
        None,
        "--shots",
        help="Few-shot: known-good references per category, e.g. 0,1,4,10 (0 = zero-shot).",
    ),
    references: Path | None = typer.Option(
        None,
        "--references",
        help="Folder of known-good images for --shots (default CATEGORY/train/good).",
    ),
    calibration: Path | None = typer.Option(
        None,
        "--calibration",
        help="A line's calibration (musc-edge calibrate): its known-good parts as references "
        "and the verdicts at its threshold. Made with the same backbone, size and blocks.",
    ),
    preset: str | None = options.Preset,
    backbone: str | None = options.Backbone,
    image_size: str | None = options.ImageSizeOption,
    layers: str | None = options.Layers,
    msm_precision: Precision | None = options.MsmPrecision,
    backbone_precision: Precision | None = options.BackbonePrecision,
    window: int | None = options.Window,
    weights: Path | None = options.Weights,
    pretrained: str | None = options.Pretrained,
    random_init: bool = options.RandomInit,
    device: str = options.Device,
) -> None:
    """Score each category's test images as one unlabeled batch and report the metrics."""
    from musc_edge.bench.datasets import list_categories, load_samples
    from musc_edge.bench.evaluate import evaluate_category, mean_metrics
    from musc_edge.calibration import load_calibration
    from musc_edge.features import torch_extractor
    from musc_edge.files import write_json_atomic
    from musc_edge.musc import MuSc

    started = time.perf_counter()
    with user_errors():
        config = options.build_config(preset, backbone, image_size, layers, msm_precision)
        categories = list_categories(dataset, root) if category == "all" else [category]
        samples = {name: load_samples(dataset, root, name) for name in categories}
        model = options.build_backbone(config, weights, pretrained, random_init)
        backbone_precision = backbone_precision or Precision.fp32
        extractor = torch_extractor(model, options.resolve_device(device), backbone_precision.dtype)
        musc = MuSc(
            config.r_list,
            config.frac,
            config.k_list,
            config.precision,
            window=window,
            grid=model.grid,
        )
        console.print(
            f"[bold]{dataset}[/] {', '.join(categories)}: {config.backbone} at "
            f"{config.image_size}px, blocks {list(model.layers)}, backbone "
            f"{backbone_precision.value}, MSM {config.precision}{window_note(window)}, "
            f"weights {model.weights.source}"
        )
        shot_counts = parse_shots(shots, references)
        calibrated = None
        if calibration is not None:
            if shots is not None:
                raise typer.BadParameter("--calibration brings its own references: drop --shots")
            calibrated = load_calibration(calibration)
            calibrated.check_settings(eval_binding(config, model), calibration, "this eval")
            shot_counts = [len(calibrated)]
        reports = []
        with progress_bar(console) as bar:
            for name, count in ((name, k) for name in categories for k in shot_counts):
                label = f"{name} {count}-shot" if shots else name
                task = bar.add_task(label, total=None)

                def show(stage: str, done: int, total: int, task=task, label=label) -> None:
                    bar.update(task, description=f"{label}: {stage}", completed=done, total=total)

                if calibrated is not None:
                    good = calibrated.references(musc.precision.dtype)
                else:
                    folder = references or root / name / "train" / "good"
                    good = reference_features(folder, count, model, extractor, musc)
                report = evaluate_category(
                    name,
                    samples[name],
                    model.preprocess,
                    extractor,
                    musc,
                    show,
                    save_maps,
                    good,
                    calibrated.threshold if calibrated else None,
                )
                report.shots = count
                reports.append(report)
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
                "backbone_precision": backbone_precision.value,
                "window": window,
                "dataset": dataset,
                "weights": asdict(model.weights),
            },
            "categories": {report_key(r, shots): asdict(r) for r in reports},
            "mean": mean_metrics(reports),
            "seconds": elapsed,
        }
        write_json_atomic(json_out, payload)
        console.print(f"results written to {json_out}")


def window_note(window: int | None) -> str:
    return "" if window is None else f" positional (window {window})"


def parse_shots(shots: str | None, references: Path | None) -> list[int]:
    """--shots 0,1,4,10 -> [0, 1, 4, 10]; without --shots, zero-shot only."""
    if shots is None:
        if references is not None:
            raise typer.BadParameter("--references is for few-shot runs: add --shots, e.g. 4")
        return [0]
    counts = [int(part) for part in shots.split(",") if part.strip().isdigit()]
    if len(counts) != len([part for part in shots.split(",") if part.strip()]):
        raise typer.BadParameter(f"--shots takes comma-separated counts >= 0, got {shots!r}")
    return counts


def eval_binding(config, model) -> dict:
    """What a calibration must match for eval: backbone, size, blocks, preprocessing, MuSc.

    The exported backbone's sha256 is not checked: eval runs the torch model, not a package."""
    from musc_edge.package import scoring_binding

    musc = {"r_list": config.r_list, "frac": config.frac, "k_list": config.k_list}
    return scoring_binding(
        config.backbone, config.image_size, model.layers, model.preprocess.to_dict(), musc
    )


def reference_features(folder: Path, count: int, model, extractor, musc):
    """The first `count` images of the known-good folder as references, None for zero-shot."""
    from musc_edge.bench.datasets import DatasetError
    from musc_edge.bench.evaluate import known_good
    from musc_edge.features import extract_features
    from musc_edge.images import list_images

    if count == 0:
        return None
    paths = list_images(folder)[:count] if folder.is_dir() else []
    if len(paths) < count:
        raise DatasetError(
            f"{count}-shot needs {count} known-good images in {folder}, found {len(paths)}; "
            "point --references at a folder of good parts (never test images)"
        )
    return known_good(musc, extract_features(paths, model.preprocess, extractor))


def report_key(report, shots: str | None) -> str:
    return f"{report.category}/{report.shots}-shot" if shots else report.category


def print_table(reports) -> None:
    """One row per category, metrics in percent, as in the paper's tables."""
    table = Table(
        "category",
        "shots",
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
            str(r.shots),
            *("-" if v is None else f"{v:.2f}" for v in cells),
            str(len(r.images)),
            f"{r.seconds:.1f}",
        )
    console.print(table)
    for r in reports:
        if r.at_threshold is not None:
            at = r.at_threshold
            console.print(
                f"{r.category}: at the calibration's threshold {at['threshold']:.4f}, recall "
                f"{at['recall']:.1f} %, false rejects {at['false_reject_rate']:.1f} %"
            )
