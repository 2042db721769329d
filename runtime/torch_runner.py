"""Torch runner (development): rebuilds the package's backbone in-process from musc.json.

The only runtime module that touches the model zoo, and only inside its constructor, so a
device that runs TensorRT or ONNX Runtime never needs open_clip or timm installed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from musc_edge.features import torch_extractor
from musc_edge.package import ModelPackage, PackageError
from musc_edge.precision import Precision, cpu_has_bf16
from musc_edge.runtime.runners import Runner, RunnerError


def weights_arguments(package: ModelPackage, allow_random_init: bool) -> dict:
    """`create_backbone` keywords for the package's weights_source."""
    kind, _, value = package.weights_source.partition(":")
    if kind == "fetched":
        if value != package.backbone:
            raise PackageError(
                f"{package.folder}: weights_source {package.weights_source!r} does not belong to "
                f"backbone {package.backbone}"
            )
        return {}  # create_backbone falls back to the fetched cache
    if kind == "file":
        path = Path(value)
        return {"weights": path if path.is_absolute() else package.path(value)}
    if kind == "pretrained":
        return {"pretrained": value}
    if kind == "random-init":
        if not allow_random_init:
            raise PackageError(
                f"{package.folder} was exported with random weights; its scores mean nothing. "
                "Allow it explicitly (--allow-random-init) for tests only"
            )
        return {"random_init": True}
    raise PackageError(f"{package.folder}: unknown weights_source {package.weights_source!r}")


class TorchRunner(Runner):
    name = "torch"
    precisions = (Precision.fp32, Precision.bf16, Precision.fp16)

    options = ("allow_random_init",)

    def load(self, allow_random_init: bool = False) -> None:
        package = self.package
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.precision is Precision.fp16 and device == "cpu":
            raise RunnerError("fp16 backbones run on CUDA only; on a CPU use bf16 or fp32")
        if self.precision is Precision.bf16 and device == "cpu" and not cpu_has_bf16():
            raise RunnerError(
                "this CPU has no native bf16 (AVX512-BF16, AMX or Arm BF16): bf16 would run "
                "slower than fp32 here; use --backbone-precision fp32"
            )
        from musc_edge.models import MissingWeightsError, create_backbone

        try:
            backbone = create_backbone(
                package.backbone,
                package.size,
                package.layers,
                **weights_arguments(package, allow_random_init),
            )
        except MissingWeightsError as error:
            raise PackageError(str(error)) from None
        recorded, found = package.weights_sha256, backbone.weights.sha256
        if recorded and found and recorded != found:
            raise PackageError(
                f"{package.folder} was exported from weights with sha256 {recorded[:12]}..., "
                f"but {backbone.weights.source} has {found[:12]}...; the scores would differ"
            )
        self.extract = torch_extractor(backbone, device, self.precision.dtype)
        self.description = (
            f"torch {torch.__version__} on {device}, {self.precision.value} "
            f"({backbone.weights.source})"
        )

    def infer_impl(self, batch: np.ndarray) -> tuple[list[torch.Tensor], torch.Tensor]:
        return self.extract(batch)
