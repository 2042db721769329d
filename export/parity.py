"""How closely the exported graph reproduces the torch model, on a few real or generated images.

The torch model's outputs on the parity images are the reference. ONNX Runtime (CPU) must
match them within `ONNXRUNTIME_TOLERANCE`; it runs the images as batches of 1 and 3, which
also proves the graph's batch is really dynamic. The first image and its reference outputs are
stored in the package, so that the device can check a TensorRT engine it builds later.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from musc_edge.bench.synthetic import part_image
from musc_edge.errors import UsageError
from musc_edge.images import Preprocess, list_images, read_image
from musc_edge.models import Backbone
from musc_edge.package import INPUT_NAME, compare_outputs

PARITY_COUNT = 4
ONNXRUNTIME_TOLERANCE = 1e-4  # max_rel, fp32 against fp32


def parity_images(preprocess: Preprocess, folder: Path | None) -> tuple[np.ndarray, str, list[str]]:
    """(PARITY_COUNT, 3, S, S) preprocessed images, where they came from, and their names.

    From `folder` (searched recursively), evenly spaced over the sorted files from the first
    to the last, so that a dataset's good and defective images both appear; without a
    folder, generated parts.
    """
    if folder is None:
        rng = np.random.default_rng(0)
        images = [part_image(256, rng, defect=index % 2 == 1) for index in range(PARITY_COUNT)]
        names = [f"generated-part-{index}" for index in range(PARITY_COUNT)]
        return np.stack([preprocess(image) for image in images]), "generated", names
    files = list_images(folder)
    if len(files) < PARITY_COUNT:
        raise UsageError(
            f"--parity-images {folder} holds {len(files)} images; {PARITY_COUNT} are needed"
        )
    last = len(files) - 1
    chosen = [files[index * last // (PARITY_COUNT - 1)] for index in range(PARITY_COUNT)]
    batch = np.stack([preprocess(read_image(path)) for path in chosen])
    return batch, str(folder), [str(path.relative_to(folder)) for path in chosen]


@torch.no_grad()
def torch_outputs(backbone: Backbone, batch: np.ndarray, names: list[str]) -> dict:
    """The reference: the torch model in fp32 on the CPU, one array per graph output."""
    tokens, embedding = backbone(torch.from_numpy(batch))
    return {name: t.numpy() for name, t in zip(names, [*tokens, embedding], strict=True)}


def onnxruntime_outputs(onnx_path: Path, batch: np.ndarray, names: list[str]) -> dict:
    """The graph on ONNX Runtime's CPU provider: the first image alone, then the rest as one
    batch (1 and 3 for the parity images), so that two batch sizes go through one session."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    runs = [session.run(names, {INPUT_NAME: part}) for part in (batch[:1], batch[1:])]
    return {name: np.concatenate(parts) for name, *parts in zip(names, *runs, strict=True)}


def onnxruntime_parity(onnx_path: Path, batch: np.ndarray, reference: dict) -> dict:
    """parity.json's onnxruntime entry."""
    outputs = onnxruntime_outputs(onnx_path, batch, list(reference))
    return compare_outputs(
        reference,
        outputs,
        ONNXRUNTIME_TOLERANCE,
        version=ort.__version__,
        provider="CPUExecutionProvider",
        batches=[1, len(batch) - 1],
    )
