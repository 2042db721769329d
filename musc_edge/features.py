"""Images -> backbone features, keeping going past unreadable files.

Every runner (torch backbone, ONNX Runtime, TensorRT) is an `Extractor`: a preprocessed
(B, 3, S, S) float32 batch in, (tokens per layer, embeddings) out. `eval` and `calibrate` extract a
list of files with this loop; the line extracts what its camera
hands out as it arrives (runtime/line.py), the camera having decoded and checked each file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from musc_edge.images import ImageReadError, Preprocess, read_image

Extractor = Callable[[np.ndarray], tuple[list[torch.Tensor], torch.Tensor]]


@dataclass(frozen=True)
class Failure:
    """A file that could not be scored and why, kept in every result record."""

    path: Path
    error: str


@dataclass
class Features:
    """Features of the readable images, in input order, plus the files that failed."""

    paths: list[Path]
    tokens: list[torch.Tensor]  # one (N, L, C) per layer
    embeddings: torch.Tensor  # (N, D)
    failures: list[Failure] = field(default_factory=list)


def load_images(
    paths: Sequence[Path], preprocess: Preprocess, full_resolution: bool = False
) -> tuple[np.ndarray, list[Path], list[Failure]]:
    """Decode and preprocess; unreadable files become failures instead of exceptions."""
    arrays, good, failures = [], [], []
    for path in paths:
        try:
            arrays.append(preprocess(read_image(path, full_resolution=full_resolution)))
            good.append(Path(path))
        except ImageReadError as error:
            failures.append(Failure(Path(path), str(error)))
    stacked = (
        np.stack(arrays) if arrays else np.empty((0, 3, *preprocess.image_size.hw), np.float32)
    )
    return stacked, good, failures


def extract_features(
    paths: Sequence[Path],
    preprocess: Preprocess,
    extractor: Extractor,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
    full_resolution: bool = False,
) -> Features:
    """Run the extractor over all paths in mini-batches; `on_batch(n)` reports progress;
    `full_resolution`: large images are not decoded reduced (a region is cut from them)."""
    tokens: list[list[torch.Tensor]] = []
    embeddings, good, failures = [], [], []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        batch, chunk_good, chunk_failures = load_images(chunk, preprocess, full_resolution)
        failures += chunk_failures
        if chunk_good:
            layer_tokens, embedding = extractor(batch)
            tokens.append([t.float().cpu() for t in layer_tokens])
            embeddings.append(embedding.float().cpu())
            good += chunk_good
        if on_batch:
            on_batch(len(chunk))
    if not good:
        raise ImageReadError(
            f"none of the {len(paths)} images could be read; first error: {failures[0].error}"
            if failures
            else "no images given"
        )
    per_layer = [torch.cat(layer) for layer in zip(*tokens, strict=True)]
    return Features(good, per_layer, torch.cat(embeddings), failures)


def torch_extractor(
    backbone: torch.nn.Module, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> Extractor:
    """An extractor around an in-process torch backbone (development and evaluation).

    A half-width `dtype` runs the matrix products under autocast (normalisations and softmax
    stay fp32) and hands float32 features on, so everything after the backbone is unchanged.
    """
    backbone = backbone.to(device)
    device_type = torch.device(device).type
    half = dtype != torch.float32

    @torch.no_grad()
    def run(batch: np.ndarray) -> tuple[list[torch.Tensor], torch.Tensor]:
        with torch.autocast(device_type, dtype=dtype, enabled=half):
            tokens, embedding = backbone(torch.from_numpy(batch).to(device))
        if half:
            return [layer.float() for layer in tokens], embedding.float()
        return tokens, embedding

    return run
