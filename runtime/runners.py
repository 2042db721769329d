"""Engine runners: one interface over TensorRT, ONNX Runtime and torch, opened per package.

A runner is a `features.Extractor` (a preprocessed (B, 3, S, S) float32 batch in, tokens per
layer and embeddings out) that also says what it runs on, so every result can name its engine.
Each backend lives in its own module and is imported only when asked for, which keeps the
runtime free of the libraries a device does not have.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from musc_edge.errors import UsageError
from musc_edge.package import ENGINE_FILE, ONNX_FILE, ModelPackage, PackageError
from musc_edge.precision import Precision, parse_precision


class RunnerError(PackageError):
    """A runner that cannot start here (backend missing, engine built elsewhere)."""


@dataclass(frozen=True)
class RunnerEntry:
    """Where a runner class lives (imported only when chosen, so a device needs only the
    libraries of the engines it runs), the package file it needs and the extra that
    installs its library."""

    module: str
    class_name: str
    artifact: str | None  # None: built from musc.json alone
    extra: str


# The runner registry, in the order `--engine auto` tries them: the one list of engine names.
RUNNERS: dict[str, RunnerEntry] = {
    "tensorrt": RunnerEntry(
        "musc_edge.runtime.tensorrt_runner", "TensorRTRunner", ENGINE_FILE, "tensorrt"
    ),
    "onnxruntime": RunnerEntry(
        "musc_edge.runtime.onnx_runner", "OnnxRuntimeRunner", ONNX_FILE, "runtime"
    ),
    "torch": RunnerEntry("musc_edge.runtime.torch_runner", "TorchRunner", None, "models"),
}
ENGINES = tuple(RUNNERS)


class Runner(ABC):
    """A loaded backbone engine; call it like an `Extractor`.

    `precision` is the backbone's arithmetic: None is the runner's default (fp32, or what a
    TensorRT engine was built with); a runner lists in `precisions` what it can run.
    """

    name: str = ""
    precisions: tuple[Precision, ...] = (Precision.fp32,)

    def __init__(
        self,
        package: ModelPackage,
        allow_random_init: bool = False,
        precision: Precision | None = None,
    ) -> None:
        self.package = package
        self.precision = precision or self.precisions[0]
        self.description = self.name

    @abstractmethod
    def __call__(self, batch: np.ndarray) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(B, 3, S, S) float32 -> ([(B, L, C)] per layer, (B, D) embeddings)."""


def open_runner(
    package: ModelPackage,
    engine: str = "auto",
    allow_random_init: bool = False,
    precision: Precision | str | None = None,
) -> Runner:
    """The runner for `engine`, or with "auto" the first registered runner that this machine
    and package can run at `precision`; the error lists why each one was passed over.
    """
    if engine not in ("auto", *ENGINES):
        raise UsageError(f"unknown engine {engine!r}; choose auto or one of {', '.join(ENGINES)}")
    precision = parse_precision(precision) if precision is not None else None
    if engine != "auto":
        return _open(engine, package, allow_random_init, precision)
    reasons = []
    for name, entry in RUNNERS.items():
        if entry.artifact is not None and not package.path(entry.artifact).is_file():
            reasons.append(f"{name}: the package has no {entry.artifact}")
            continue
        try:
            return _open(name, package, allow_random_init, precision)
        except PackageError as error:  # RunnerError included
            reasons.append(f"{name}: {error}")
    raise RunnerError(f"no engine can run {package.folder} here: " + "; ".join(reasons))


def _open(
    name: str, package: ModelPackage, allow_random_init: bool, precision: Precision | None
) -> Runner:
    entry = RUNNERS[name]
    try:
        runner_class = getattr(importlib.import_module(entry.module), entry.class_name)
    except ImportError as error:
        missing = error.name or error
        raise RunnerError(
            f"the {name} engine needs {missing}: install musc-edge with the {entry.extra} extra"
        ) from None
    if precision is not None and precision not in runner_class.precisions:
        runs = ", ".join(p.value for p in runner_class.precisions)
        raise RunnerError(
            f"the {name} engine runs the backbone in {runs} only, not {precision.value}"
        )
    return runner_class(package, allow_random_init, precision)
