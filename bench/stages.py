"""Stage-by-stage latency of the line pipeline, its scaling with batch size, and the original
MuSc approach run side by side in the same process on the same images.

Line engineers size hardware from these numbers, so each stage is timed on its own (with a
CUDA synchronise where it runs on a GPU) and a speed-up is only claimed where the outputs of
the two pipelines agree.
"""

from __future__ import annotations

import json
import resource
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from musc_edge.errors import MuscEdgeError
from musc_edge.features import Extractor
from musc_edge.images import Preprocess, list_images, read_image
from musc_edge.musc import Hooks, MuSc, References
from musc_edge.parallel import thread_map
from musc_edge.profile import Profile
from musc_edge.visualize import normalise_maps, overlay, write_png

STAGES = ("decode", "backbone", "lnamd", "bank", "msm", "rscin", "write")  # bank: calibrated
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 3e-2}  # max abs difference of patch maps


class BenchError(MuscEdgeError):
    """A benchmark that cannot run as asked."""


@dataclass
class Pipeline:
    """One way of turning decoded images into maps and scores, stage by stage: the MuSc
    settings (backend, pooling, precision) decide how LNAMD, MSM and RsCIN run."""

    name: str
    preprocess: Preprocess
    extractor: Extractor
    musc: MuSc
    max_batch: int = 8
    known_good: References | None = None  # a calibration's parts: they vote, and the bank


@dataclass
class RunOutput:
    """Times of every stage for one run, and what the run produced."""

    times: dict[str, float]
    patch_maps: torch.Tensor
    scores: torch.Tensor


@dataclass
class Measurement:
    """All runs of one pipeline at one batch size."""

    pipeline: str
    batch_size: int
    runs: list[dict[str, float]] = field(default_factory=list)
    peak_host_mib: float = 0.0
    peak_gpu_allocated_mib: float | None = None
    peak_gpu_reserved_mib: float | None = None

    def summary(self) -> dict:
        """Median, p95 and max per stage, per batch and per image; images per second."""
        stages = {}
        for stage in (*STAGES, "total"):
            if stage not in self.runs[0]:
                continue  # "bank" runs only with a calibration
            values = sorted(run[stage] for run in self.runs)
            stages[stage] = {
                "median_s": statistics.median(values),
                "p95_s": float(np.percentile(values, 95)),
                "max_s": values[-1],
                "median_per_image_ms": 1000 * statistics.median(values) / self.batch_size,
            }
        return {
            "pipeline": self.pipeline,
            "batch_size": self.batch_size,
            "runs": len(self.runs),
            "stages": stages,
            "images_per_s": self.batch_size / stages["total"]["median_s"],
            "peak_host_mib": self.peak_host_mib,
            "peak_gpu_allocated_mib": self.peak_gpu_allocated_mib,
            "peak_gpu_reserved_mib": self.peak_gpu_reserved_mib,
        }


def run_once(pipeline: Pipeline, paths: Sequence[Path], out_dir: Path) -> RunOutput:
    """Decode+preprocess, backbone, LNAMD, MSM, RsCIN and result writing for one batch."""
    watch = Profile()  # the line's own stage timer (musc_edge/profile.py)
    with watch.stage("decode"):
        images = thread_map(read_image, paths)
        batch = np.stack(thread_map(pipeline.preprocess, images))
    tokens: list[list[torch.Tensor]] = []
    embeddings = []
    with watch.stage("backbone"):
        for start in range(0, len(batch), pipeline.max_batch):
            layer_tokens, embedding = pipeline.extractor(batch[start : start + pipeline.max_batch])
            tokens.append(layer_tokens)
            embeddings.append(embedding)
        per_layer = [torch.cat(layer) for layer in zip(*tokens, strict=True)]
        embedding_all = torch.cat(embeddings)
    result = pipeline.musc.score(
        per_layer, embedding_all, hooks=Hooks(stage=watch.stage), known_good=pipeline.known_good
    )
    maps = result.verdict_maps.float().cpu()
    scores = result.verdict_scores
    with watch.stage("write"):
        write_results(out_dir, images, maps, scores.cpu())
    times = {name: ms / 1000 for name, ms in watch.ms.items()}
    times["total"] = sum(times.values())
    return RunOutput(times, maps, scores.float().cpu())


def write_results(
    out_dir: Path, images: Sequence[np.ndarray], maps: torch.Tensor, scores: torch.Tensor
) -> None:
    """A JSON line and a heatmap overlay PNG per image: the core of what the line writes,
    without its journal's fsync, CSV, manifest and masks (`bench line` and `bench sinks` time
    the line itself)."""
    heat = normalise_maps(maps.numpy(), "batch")

    def write_overlay(index: int) -> None:
        write_png(out_dir / f"{index:05d}.png", overlay(images[index], heat[index]))

    thread_map(write_overlay, range(len(images)))
    with open(out_dir / "results.jsonl", "w") as journal:
        for index, score in enumerate(scores.tolist()):
            journal.write(json.dumps({"index": index, "score": score}) + "\n")


def measure(
    pipeline: Pipeline,
    paths: Sequence[Path],
    runs: int,
    warmup: int,
    on_run: Callable[[], None] | None = None,
) -> tuple[Measurement, RunOutput]:
    """`warmup` untimed runs, then `runs` timed ones; returns the last run's output too."""
    result = Measurement(pipeline.name, len(paths))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as work:
        for index in range(warmup + runs):
            output = run_once(pipeline, paths, Path(work))
            if index >= warmup:
                result.runs.append(output.times)
            if on_run:
                on_run()
    result.peak_host_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        result.peak_gpu_allocated_mib = torch.cuda.max_memory_allocated() / 2**20
        result.peak_gpu_reserved_mib = torch.cuda.max_memory_reserved() / 2**20
    return result, output


def agreement(ours: RunOutput, original: RunOutput, precision: str) -> dict:
    """Largest differences of maps and scores, and whether they are within tolerance."""
    map_diff = float((ours.patch_maps - original.patch_maps).abs().max())
    score_diff = float((ours.scores - original.scores).abs().max())
    tolerance = TOLERANCE[precision]
    return {
        "max_map_diff": map_diff,
        "max_score_diff": score_diff,
        "tolerance": tolerance,
        "agree": map_diff <= tolerance and score_diff <= tolerance * 10,
    }


def speedups(ours: dict, original: dict) -> dict[str, float]:
    """Original median over ours, per stage and in total."""
    median = {name: run["stages"] for name, run in (("ours", ours), ("original", original))}
    return {
        stage: median["original"][stage]["median_s"] / max(median["ours"][stage]["median_s"], 1e-12)
        for stage in ("backbone", "msm", "total")
    }


def batch_paths(folder: Path, batch_size: int) -> tuple[list[Path], bool]:
    """The first `batch_size` images of a folder (sorted), repeated in order if there are
    fewer; the flag says whether repetition was needed (timings hold, scores do not)."""
    files = list_images(folder)
    if not files:
        raise BenchError(f"no images under {folder}")
    repeated = len(files) < batch_size
    return [files[i % len(files)] for i in range(batch_size)], repeated
