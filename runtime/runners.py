"""Engine runners: one interface over TensorRT, ONNX Runtime and torch, opened per package.

A runner is a `features.Extractor` (a preprocessed (B, 3, S, S) float32 batch in, tokens per
layer and embeddings out) that also says what it runs on, so every result can name its engine.
Each backend lives in its own module and is imported only when asked for, which keeps the
runtime free of the libraries a device does not have.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch

from musc_edge.package import ENGINE_FILE, ONNX_FILE, ModelPackage, PackageError

ENGINES = ("tensorrt", "onnxruntime", "torch")


class RunnerError(PackageError):
    """A runner that cannot start here (backend missing, engine built elsewhere)."""


class Runner(ABC):
    """A loaded backbone engine; call it like an `Extractor`."""

    name: str = ""

    def __init__(self, package: ModelPackage) -> None:
        self.package = package
        self.description = self.name

    @abstractmethod
    def __call__(self, batch: np.ndarray) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(B, 3, S, S) float32 -> ([(B, L, C)] per layer, (B, D) embeddings)."""


def open_runner(
    package: ModelPackage, engine: str = "auto", allow_random_init: bool = False
) -> Runner:
    """The runner for `engine`, or with "auto" the first of TensorRT, ONNX Runtime, torch
    that this machine and package can run; the error lists why each one was passed over.
    """
    if engine not in ("auto", *ENGINES):
        raise ValueError(f"unknown engine {engine!r}; choose auto or one of {', '.join(ENGINES)}")
    if engine != "auto":
        return _open(engine, package, allow_random_init)
    reasons = []
    for name in ENGINES:
        if name != "torch" and not package.path(_ARTIFACT[name]).is_file():
            reasons.append(f"{name}: the package has no {_ARTIFACT[name]}")
            continue
        try:
            return _open(name, package, allow_random_init)
        except PackageError as error:  # RunnerError included
            reasons.append(f"{name}: {error}")
    raise RunnerError(f"no engine can run {package.folder} here: " + "; ".join(reasons))


_ARTIFACT = {"tensorrt": ENGINE_FILE, "onnxruntime": ONNX_FILE}
_EXTRA = {"tensorrt": "tensorrt", "onnxruntime": "runtime", "torch": "models"}


def _open(name: str, package: ModelPackage, allow_random_init: bool) -> Runner:
    try:
        if name == "tensorrt":
            from musc_edge.runtime.tensorrt_runner import TensorRTRunner

            return TensorRTRunner(package)
        if name == "onnxruntime":
            from musc_edge.runtime.onnx_runner import OnnxRuntimeRunner

            return OnnxRuntimeRunner(package)
        from musc_edge.runtime.torch_runner import TorchRunner

        return TorchRunner(package, allow_random_init)
    except ImportError as error:
        missing = error.name or error
        raise RunnerError(
            f"the {name} engine needs {missing}: install musc-edge with the {_EXTRA[name]} extra"
        ) from None
