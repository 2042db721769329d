"""`musc-edge bench msm`: the MSM op against the original MuSc approach, on the same inputs."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Console

from musc_edge.cli import options
from musc_edge.cli.errors import user_errors
from musc_edge.precision import Precision

console = Console(soft_wrap=True)  # long paths stay whole in logs, whatever the width
BUSY_LOAD = 0.5  # 1-minute load average above which the timings are not trustworthy


def timed_runs(
    fn: Callable[[list], list], inputs: list, runs: int, sync: Callable[[], None]
) -> tuple[list[float], list]:
    """Wall seconds of `runs` calls over all inputs, after an untimed warm-up on the first
    (kernel compilation, allocator); and the last call's outputs."""
    fn(inputs[:1])
    sync()
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        outputs = fn(inputs)
        sync()
        seconds.append(time.perf_counter() - started)
    return seconds, outputs


def bench_msm(
    n: int = typer.Option(83, "--n", help="Images per batch."),
    grid: int = typer.Option(16, "--grid", help="Patch grid side h; L = h * h patches."),
    dim: int = typer.Option(384, "--dim", help="Feature width C."),
    sets: int = typer.Option(12, "--sets", help="(layer, r) sets per batch, timed together."),
    msm_precision: Precision = typer.Option(
        Precision.fp32, "--msm-precision", help="Precision of our op: fp32 (exact), bf16, fp16."
    ),
    backend: str = typer.Option(
        "op", "--backend", help="MSM backend to time (op, torch, tiles, triton)."
    ),
    runs: int = typer.Option(3, "--runs", help="Timed runs of all sets; the median is shown."),
    window: int | None = options.Window,
    device: str = options.Device,
    json_out: Path | None = typer.Option(None, "--json", help="Write the numbers here."),
) -> None:
    """Time MSM (our op vs original-style cdist) on random unit vectors, report speed-up and
    the largest difference of the patch scores. With --window, ours is positional MSM: the
    difference to the original (global) is then by design, not an error."""
    import torch

    from musc_edge.msm import BACKENDS
    from musc_edge.musc import MuSc

    if backend not in BACKENDS:
        raise typer.BadParameter(f"--backend must be one of {', '.join(BACKENDS)}")
    with user_errors():
        ours_musc = MuSc(precision=msm_precision, backend=backend, window=window)
    original_musc = MuSc(backend="original")

    where = torch.device(options.resolve_device(device))
    load = os.getloadavg()[0]
    if load >= BUSY_LOAD:
        console.print(f"[yellow]note:[/] load average {load:.2f}; other processes skew timings")
    generator = torch.Generator().manual_seed(0)
    inputs = [
        torch.nn.functional.normalize(
            torch.randn(n, grid * grid, dim, generator=generator), dim=-1
        ).to(where)
        for _ in range(sets)
    ]
    sync = torch.cuda.synchronize if where.type == "cuda" else (lambda: None)

    def ours(batch: list[torch.Tensor]) -> list[torch.Tensor]:
        return [ours_musc.patch_scores([z]) for z in batch]

    def original(batch: list[torch.Tensor]) -> list[torch.Tensor]:
        return [original_musc.patch_scores([z]) for z in batch]

    ours_s, ours_out = timed_runs(ours, inputs, runs, sync)
    original_s, original_out = timed_runs(original, inputs, runs, sync)
    diff = max((a - b).abs().max().item() for a, b in zip(ours_out, original_out, strict=True))
    flop = sets * n * (n - 1) / 2 * window_cells(grid, window) * dim * 2  # each pair once
    ours_median, original_median = statistics.median(ours_s), statistics.median(original_s)
    machine = (
        torch.cuda.get_device_name(where)
        if where.type == "cuda"
        else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    label = f"ours ({backend}, {msm_precision.value})"
    if window is not None:
        label = f"ours (window {window}, {msm_precision.value})"
    console.print(
        f"MSM, {sets} sets of N={n}, L={grid * grid}, C={dim} on {machine}, median of {runs}:\n"
        f"  {label:29s}{ours_median:8.3f} s  "
        f"({flop / ours_median / 1e9:.0f} GFLOP/s counting each pair once)\n"
        f"  original-style cdist (fp32)  {original_median:8.3f} s\n"
        f"  speed-up                     {original_median / ours_median:8.2f} x\n"
        f"  max |ours - original|        {diff:8.2e}"
        + ("" if window is None else "  (positional vs global: different by design)")
    )
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "machine": machine,
            "load_average_at_start": load,
            "torch": torch.__version__,
            "shape": {"n": n, "grid": grid, "dim": dim, "sets": sets},
            "msm_precision": msm_precision.value,
            "backend": backend,
            "window": window,
            "ours_seconds": ours_s,
            "original_seconds": original_s,
            "ours_median": ours_median,
            "original_median": original_median,
            "speedup": original_median / ours_median,
            "max_abs_diff": diff,
        }
        json_out.write_text(json.dumps(payload, indent=2))


def window_cells(grid: int, window: int | None) -> int:
    """Patch pairs (p, q) one image pair compares: L^2 globally; with a window, every q in
    the window around p, clipped at the border."""
    if window is None:
        return grid**4
    radius = window // 2
    per_axis = sum(min(x + radius, grid - 1) - max(x - radius, 0) + 1 for x in range(grid))
    return per_axis**2
