"""`musc-edge calibrate`: teach a model package what good parts look like."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from musc_edge.cli import options
from musc_edge.cli.errors import user_errors
from musc_edge.cli.progress import progress_bar

if TYPE_CHECKING:
    from musc_edge.musc import MuSc
    from musc_edge.package import ModelPackage
    from musc_edge.region import Region
    from musc_edge.runtime.runners import Runner

console = Console(soft_wrap=True)  # long paths stay whole in logs, whatever the width


def calibrate(
    model: Path = typer.Option(..., "--model", help="Model package folder (musc-edge export)."),
    good: Path = typer.Option(..., "--good", help="Folder of known-good part images (5 or more)."),
    out: Path | None = typer.Option(
        None, "--out", help="Calibration file to write (.safetensors); or give --config."
    ),
    config: Path | None = typer.Option(
        None,
        "--config",
        help="A line config with items: calibrate every item on its own box, each into the "
        "calibration file the config names for it.",
    ),
    parts: int | None = typer.Option(
        None, "--parts", min=1, help="Use only the first N images of --good (sorted by name)."
    ),
    target_frr: float = typer.Option(
        0.01, "--target-frr", help="False-reject rate the threshold is set for (0.01 = 1 %)."
    ),
    region: str | None = typer.Option(
        None,
        "--region",
        help="Cut every part to this box first, x,y,width,height in pixels: the line's "
        "--region (a calibration serves one region).",
    ),
    coreset: float | None = typer.Option(
        None,
        "--coreset",
        help="Fraction of the good patches kept in the bank (greedy k-centre; default 0.25, "
        "1: all): what each part is measured against, so it sets the time per part "
        "(docs/benchmarks.md).",
    ),
    bank_size: int | None = typer.Option(
        None,
        "--bank-size",
        min=1,
        help="At most this many good patches per pooled set (default 2048), so the time per "
        "part stays bounded however many parts are taught and whatever the input size.",
    ),
    aligned: bool = typer.Option(
        False,
        "--aligned",
        help="Parts held in a fixture: judge each position against the same position of the "
        "good parts (catches a defect repeating at one place).",
    ),
    engine: options.Engine = options.EngineOpt,
    allow_random_init: bool = typer.Option(
        False, "--allow-random-init", help="Torch engine: accept a random-weights package (tests)."
    ),
) -> None:
    """Store the good parts' features, their score spread and a threshold, bound to MODEL.

    `musc-edge run --calibration OUT` then judges every part against these parts, with one
    threshold for every batch (docs/verdicts.md).
    """
    from musc_edge.calibration import MIN_PARTS, CalibrationError
    from musc_edge.images import list_images
    from musc_edge.musc import MuSc
    from musc_edge.package import load_package
    from musc_edge.runtime.runners import open_runner

    with user_errors():
        jobs = calibrations_to_make(out, config, region)
        if not good.is_dir():
            raise CalibrationError(f"--good {good} is not a folder of images")
        paths = list_images(good)[:parts]
        if len(paths) < MIN_PARTS:
            raise CalibrationError(
                f"{good} holds {len(paths)} images; a calibration needs at least {MIN_PARTS}"
            )
        package = load_package(model)
        runner = open_runner(package, engine.value, allow_random_init=allow_random_init)
        musc = MuSc.for_package(package)
        settings = (target_frr, aligned, bank_size, coreset)
        for name, box, destination in jobs:
            where = "" if name is None else f" (item {name}, region {box})"
            console.print(f"calibrating {package.folder} on {len(paths)} parts from {good}{where}")
            calibrate_one(package, runner, musc, good, paths, box, settings, destination)


def calibrations_to_make(
    out: Path | None, config: Path | None, region: str | None
) -> list[tuple[str | None, Region | None, Path]]:
    """(item name, box, file) for each calibration to write: --out's, or each item's of a
    line config (--config), so one command teaches every item of a line."""
    from musc_edge.cli.line_config import read_items
    from musc_edge.errors import UsageError
    from musc_edge.region import Region

    if (out is None) == (config is None):
        raise UsageError("give --out FILE, or --config LINE.yaml to calibrate its items")
    if config is None:
        return [(None, None if region is None else Region.parse(region), out)]
    if region is not None:
        raise UsageError("--config takes each item's region from the file; leave out --region")
    items = read_items(config)
    if not items:
        raise UsageError(f"{config} has no items; give --out FILE (and --region) instead")
    missing = [name for name, item in items.items() if item.calibration is None]
    if missing:
        raise UsageError(
            f"{config}: item {missing[0]} names no calibration file to write; add "
            f"calibration: {missing[0]}.safetensors"
        )
    return [(name, Region(*item.region), item.calibration) for name, item in items.items()]


def calibrate_one(
    package: ModelPackage,
    runner: Runner,
    musc: MuSc,
    good: Path,
    paths: list[Path],
    box: Region | None,
    settings: tuple[float, bool, int | None, float | None],
    out: Path,
) -> None:
    """One calibration: the parts (cut to `box`) extracted, scored held-out, saved, shown."""
    from musc_edge.calibration import BANK_PATCHES, CORESET, calibrate, save_calibration
    from musc_edge.features import extract_features
    from musc_edge.region import cropped
    from musc_edge.runtime.record import utc_now

    target_frr, aligned, bank_size, coreset = settings
    with progress_bar(console) as bar:
        task = bar.add_task("features", total=len(paths))
        features = extract_features(
            paths,
            cropped(package.preprocessing(), box),
            runner,
            batch_size=package.max_batch,
            on_batch=lambda count: bar.advance(task, count),
            full_resolution=box is not None,
        )
        bar.update(task, description="scoring the parts against each other")
        files = [str(path.relative_to(good)) for path in features.paths]
        result = calibrate(
            package,
            musc,
            features.tokens,
            features.embeddings,
            files,
            target_frr,
            aligned,
            bank_size or BANK_PATCHES,
            CORESET if coreset is None else coreset,
        )
    result.info = {"good": str(good.resolve()), "created": utc_now()}
    result.info["region"] = None if box is None else box.to_json()
    result.info["engine"] = runner.description
    summary = result.summary()
    result.info["threshold_confidence"] = {
        key: summary[key] for key in ("confidence", "frr_upper_bound", "parts_for_target")
    }
    save_calibration(result, out)
    for failure in features.failures:
        console.print(f"[yellow]skipped[/] {failure.path}: {failure.error}")
    console.print(
        f"{summary['parts']} known-good parts"
        + (" (aligned: scores in multiples of the threshold)" if aligned else "")
        + f"; their scores {summary['score_min']:.4f} to "
        f"{summary['score_max']:.4f} (median {summary['score_median']:.4f}); bank "
        f"{summary['bank_patches']} patches per set, {summary['voters']} parts vote in MSM\n"
        f"threshold {summary['threshold']:.4f} for a false-reject rate of "
        f"{100 * target_frr:g} %; {100 * summary['leave_one_out_frr']:.1f} % of these parts "
        "score above it when each is held out\n"
        f"{how_sure(summary)}\n"
        f"written to {out}"
    )


def how_sure(summary: dict) -> str:
    """The threshold's confidence in words: what the parts show, and what would show more."""
    return (
        f"how sure: with {summary['parts']} parts the false-reject rate is below "
        f"{100 * summary['frr_upper_bound']:.1f} % at {100 * summary['confidence']:g} % "
        f"confidence; {summary['parts_for_target']} good parts with none held out above the "
        f"threshold would show {100 * summary['target_frr']:g} %"
    )
