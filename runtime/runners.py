"""Engine runners: one interface over TensorRT, OpenVINO, ONNX Runtime and torch, per package.

A runner is a `features.Extractor` (a preprocessed (B, 3, S, S) float32 batch in, tokens per
layer and embeddings out) that also says what it runs on, so every result can name its engine.
Each backend lives in its own module and is imported only when asked for, which keeps the
runtime free of the libraries a device does not have.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

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
    # Whether it runs on a GPU here: True, False, or the name of a function in `module` that
    # says so (an engine that runs on a CPU or a GPU, depending on the build installed).
    on_gpu: bool | str = False


# The runner registry: the one list of engine names. `--engine auto` tries the engines that
# run on a GPU here first, then the CPU ones, each group in this order; the CPU order is the
# measured speed order (docs/cpu-runners.md), torch last as the development fallback.
RUNNERS: dict[str, RunnerEntry] = {
    "tensorrt": RunnerEntry(
        "musc_edge.runtime.tensorrt_runner", "TensorRTRunner", ENGINE_FILE, "tensorrt", True
    ),
    "openvino": RunnerEntry(
        "musc_edge.runtime.openvino_runner", "OpenVinoRunner", ONNX_FILE, "openvino"
    ),
    "onnxruntime": RunnerEntry(
        "musc_edge.runtime.onnx_runner", "OnnxRuntimeRunner", ONNX_FILE, "runtime", "runs_on_gpu"
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

    def onnx_path(self) -> Path:
        """The package's ONNX graph, for the runners that read it."""
        path = self.package.path(ONNX_FILE)
        if not path.is_file():
            raise PackageError(
                f"{self.package.folder} has no {ONNX_FILE}; export the package again"
            )
        return path

    def check_outputs(self, path: Path, present: Iterable[str]) -> None:
        """The graph at `path` must offer every output the package's musc.json names."""
        found = set(present)
        missing = [name for name in self.package.output_names if name not in found]
        if missing:
            raise PackageError(
                f"{path} lacks the outputs {missing} that {self.package.folder}/musc.json names; "
                "the graph and the manifest do not belong together, export again"
            )

    @abstractmethod
    def __call__(self, batch: np.ndarray) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(B, 3, S, S) float32 -> ([(B, L, C)] per layer, (B, D) embeddings)."""


def open_runner(
    package: ModelPackage,
    engine: str = "auto",
    allow_random_init: bool = False,
    precision: Precision | str | None = None,
) -> Runner:
    """The runner for `engine`, or with "auto" the first runner in `auto_order()` that this
    machine and package can run at `precision`; the error lists why each one was passed over.
    """
    if engine not in ("auto", *ENGINES):
        raise UsageError(f"unknown engine {engine!r}; choose auto or one of {', '.join(ENGINES)}")
    precision = parse_precision(precision) if precision is not None else None
    if engine != "auto":
        return _open(engine, package, allow_random_init, precision)
    reasons = []
    for name in auto_order():
        entry = RUNNERS[name]
        if entry.artifact is not None and not package.path(entry.artifact).is_file():
            reasons.append(f"{name}: the package has no {entry.artifact}")
            continue
        try:
            return _open(name, package, allow_random_init, precision)
        except PackageError as error:  # RunnerError included
            reasons.append(f"{name}: {error}")
    raise RunnerError(f"no engine can run {package.folder} here: " + "; ".join(reasons))


def auto_order() -> list[str]:
    """The engines `--engine auto` tries, in order: GPU engines first (a GPU beats any CPU
    runner), then CPU engines, each group in registry order."""
    return sorted(RUNNERS, key=lambda name: not _runs_on_gpu(RUNNERS[name]))


def _runs_on_gpu(entry: RunnerEntry) -> bool:
    if isinstance(entry.on_gpu, bool):
        return entry.on_gpu
    try:
        return bool(getattr(importlib.import_module(entry.module), entry.on_gpu)())
    except ImportError:
        return False  # not installed: _open says so when its turn comes


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
