"""`musc-edge bench bank`: recall and time per part of a calibrated line judged alone, against
the bank's size, the similarity precision and the input size (bench/banks.py)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from musc_edge.cli import options
from musc_edge.cli.errors import user_errors
from musc_edge.precision import Precision

console = Console()


def bench_bank(
    model: list[Path] = typer.Option(
        ..., "--model", "-m", help="Model package folder (repeatable: one per input size)."
    ),
    root: Path = typer.Option(..., "--root", help="MVTec-style dataset root."),
    category: str = typer.Option("bottle", "--category", "-c", help="Category to measure."),
    parts: int | None = typer.Option(
        None, "--parts", min=5, help="Teach the first N of train/good (default: all)."
    ),
    coreset: list[float] = typer.Option(
        [0.01, 0.05, 0.1, 0.25, 1.0],
        "--coreset",
        help="Fraction of the good patches kept in the bank (repeatable).",
    ),
    bank_size: int | None = typer.Option(
        None,
        "--bank-size",
        min=1,
        help="At most this many patches per set, as for calibrate (default: calibrate's).",
    ),
    precision: list[Precision] = typer.Option(
        [Precision.fp32], "--precision", help="Similarity precision of the bank (repeatable)."
    ),
    engine: options.Engine = options.EngineOpt,
    json_out: Path | None = typer.Option(None, "--json", help="Write every row as JSON."),
) -> None:
    """Teach each package with the first PARTS good parts at each coreset fraction, judge every
    test part alone against the bank, and report recall and false rejects at the calibration's
    threshold, the AUROC, and the median ms per part of the backbone and of the scorer."""
    from musc_edge.bench.banks import bank_rows
    from musc_edge.bench.datasets import load_samples
    from musc_edge.calibration import BANK_PATCHES
    from musc_edge.files import write_json_atomic
    from musc_edge.images import list_images
    from musc_edge.package import load_package
    from musc_edge.runtime.runners import open_runner

    rows: list = []

    def keep(row) -> None:
        rows.append(row)
        console.print(
            f"  {row.image_size} coreset {row.coreset:g} {row.precision}: recall "
            f"{row.recall:.1f} %, {row.false_rejects} of {row.good} rejected, AUROC "
            f"{row.auroc:.2f}, {row.score_ms:.1f} ms against {row.features_ms:.0f}"
        )
        if json_out:  # after every row, so a long run keeps what it measured
            payload = {"root": str(root), "category": category, "parts": len(good)}
            write_json_atomic(json_out, {**payload, "rows": [r.to_json() for r in rows]})

    with user_errors():
        samples = load_samples("mvtec", root, category)
        good = list_images(root / category / "train" / "good")[:parts]
        for folder in model:
            package = load_package(folder)
            runner = open_runner(package, engine.value)
            console.print(
                f"{package.folder}: {len(good)} good parts taught, {len(samples)} test parts"
            )
            cap = bank_size or BANK_PATCHES
            bank_rows(package, runner, good, samples, coreset, precision, cap, keep)
    show(rows)


def show(rows: list) -> None:
    table = Table(
        "size", "coreset", "precision", "bank", "recall %", "false rejects", "AUROC",
        "features ms", "score ms", "score/features",
    )  # fmt: skip
    for row in rows:
        table.add_row(
            row.image_size,
            f"{row.coreset:g}",
            row.precision,
            str(row.bank_patches),
            f"{row.recall:.1f}",
            f"{row.false_rejects} of {row.good}",
            f"{row.auroc:.2f}",
            f"{row.features_ms:.0f}",
            f"{row.score_ms:.1f}",
            f"{row.ratio:.3f}",
        )
    console.print(table)
