"""Engine runners: one interface over TensorRT, OpenVINO, ONNX Runtime and torch, per package.

A runner is a `features.Extractor` (a preprocessed (B, 3, S, S) float32 batch in, tokens per
layer and embeddings out) that also says what it runs on, so every result can name its engine.
Each backend lives in its own module and is imported only when asked for, which keeps the
runtime free of the libraries a device does not have.
"""

from __future__ import annotations

import importlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from musc_edge.errors import UsageError
from musc_edge.package import ENGINE_FILE, ONNX_FILE, ModelPackage, PackageError
from musc_edge.precision import Precision, parse_precision
from musc_edge.size import ImageSize


class RunnerError(PackageError):
    """A runner that cannot start here (backend missing, engine built elsewhere)."""


def onnxruntime_on_gpu() -> bool:
    """Whether the onnxruntime build installed has a GPU provider; imports it only when asked."""
    from musc_edge.runtime import onnx_runner

    return onnx_runner.runs_on_gpu()


@dataclass(frozen=True)
class RunnerEntry:
    """Where a runner class lives (imported only when chosen, so a device needs only the
    libraries of the engines it runs), the package file it needs and the extra that
    installs its library."""

    module: str
    class_name: str
    artifact: str | None  # None: built from musc.json alone
    extra: str
    # Whether it runs on a GPU here: True, False, or a probe that says so (an engine that runs
    # on a CPU or a GPU, depending on the build installed); a probe whose library is missing
    # (ImportError) counts as False.
    on_gpu: bool | Callable[[], bool] = False
    # The runner-specific options its class takes (its `Runner.options`), listed here too so
    # that open_runner can sort options out without importing any backend.
    options: tuple[str, ...] = ()


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
        "musc_edge.runtime.onnx_runner",
        "OnnxRuntimeRunner",
        ONNX_FILE,
        "runtime",
        onnxruntime_on_gpu,
    ),
    "torch": RunnerEntry(
        "musc_edge.runtime.torch_runner",
        "TorchRunner",
        None,
        "models",
        options=("allow_random_init",),
    ),
}
ENGINES = tuple(RUNNERS)


class Runner(ABC):
    """A loaded backbone engine; call it like an `Extractor`.

    `precision` is the backbone's arithmetic: None is the runner's default (fp32, or what a
    TensorRT engine was built with); a runner lists in `precisions` what it can run.
    `options` are the keyword options its `load` takes (the torch runner's
    `allow_random_init`); any other is refused.

    The one constructor checks the precision and the options, then calls the subclass's
    `load`; calling the runner checks the batch, calls `infer_impl` and keeps its time in
    `last_ms`.
    """

    name: ClassVar[str] = ""
    precisions: ClassVar[tuple[Precision, ...]] = (Precision.fp32,)
    options: ClassVar[tuple[str, ...]] = ()
    # Whether a call takes at most package.max_batch images (a TensorRT engine's profile).
    batch_limited: ClassVar[bool] = False

    def __init__(
        self, package: ModelPackage, precision: Precision | None = None, **options: Any
    ) -> None:
        if unknown := [key for key in options if key not in self.options]:
            takes = ", ".join(self.options) or "none"
            raise UsageError(
                f"the {self.name} engine takes no option {', '.join(unknown)} (its options: "
                f"{takes})"
            )
        if precision is not None and precision not in self.precisions:
            runs = ", ".join(p.value for p in self.precisions)
            raise RunnerError(
                f"the {self.name} engine runs the backbone in {runs} only, not {precision.value}"
            )
        self.package = package
        self.precision = precision or self.default_precision()
        self.description = self.name
        self.last_ms: float | None = None  # the last call's time, input check excluded
        self.load(**options)

    def default_precision(self) -> Precision:
        """The precision run when none is asked for."""
        return self.precisions[0]

    def load(self, **options: Any) -> None:  # noqa: B027 (a runner may have nothing to load)
        """Load the engine: the subclass's own work; `options` are among its `options`."""

    @property
    def image_size(self) -> ImageSize:
        """The (height, width) of the (B, 3, height, width) batches this runner takes."""
        return self.package.size

    def check_batch(self, batch: object) -> None:
        """A float32 numpy array of shape (B, 3, height, width), B >= 1 (at most the package's
        max_batch where `batch_limited`); the error names the shape expected."""
        size = self.image_size
        limit = self.package.max_batch if self.batch_limited else None
        shape = f"(B, 3, {size.height}, {size.width})"
        if isinstance(batch, np.ndarray):
            fits = batch.dtype == np.float32 and batch.ndim == 4 and len(batch) >= 1
            fits = fits and batch.shape[1:] == (3, *size.hw)
            if fits and (limit is None or len(batch) <= limit):
                return
            given = f"a {batch.dtype} array of shape {batch.shape}"
        else:
            given = type(batch).__name__
        within = f" with B from 1 to {limit}" if limit else " with B >= 1"
        raise ValueError(
            f"the {self.name} engine takes a float32 numpy array of shape {shape}{within}, "
            f"not {given}"
        )

    def __call__(self, batch: np.ndarray) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(B, 3, S, S) float32 -> ([(B, L, C)] per layer, (B, D) embeddings)."""
        self.check_batch(batch)
        started = time.perf_counter()
        features = self.infer_impl(batch)
        self.last_ms = (time.perf_counter() - started) * 1000
        return features

    def in_chunks(self, batch: np.ndarray) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Any number of images as calls of at most the package's max_batch (the batch an
        engine was built for), joined again in float32."""
        step = self.package.max_batch
        chunks = [self(batch[start : start + step]) for start in range(0, len(batch), step)]
        tokens = [torch.cat(layer).float() for layer in zip(*(c[0] for c in chunks), strict=True)]
        return tokens, torch.cat([c[1] for c in chunks]).float()

    @abstractmethod
    def infer_impl(self, batch: np.ndarray) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The engine's own call, on a batch already checked."""

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


def open_runner(
    package: ModelPackage,
    engine: str = "auto",
    precision: Precision | str | None = None,
    **options: Any,
) -> Runner:
    """The runner for `engine`, or with "auto" the first runner in `auto_order()` that this
    machine and package can run at `precision`; the error lists why each one was passed over.

    `options` are runner-specific (`allow_random_init=True`: the torch runner accepts a
    random-weights package); each runner gets those its registry entry lists (so an option
    for one engine never stops another), and an option that no engine takes is refused.
    """
    if engine not in ("auto", *ENGINES):
        raise UsageError(f"unknown engine {engine!r}; choose auto or one of {', '.join(ENGINES)}")
    known = [key for entry in RUNNERS.values() for key in entry.options]
    if unknown := [key for key in options if key not in known]:
        raise UsageError(
            f"no engine takes the option {', '.join(unknown)}; the options are {', '.join(known)}"
        )
    precision = parse_precision(precision) if precision is not None else None
    if engine != "auto":
        return _open(engine, package, precision, options)
    reasons = []
    for name in auto_order():
        entry = RUNNERS[name]
        if entry.artifact is not None and not package.path(entry.artifact).is_file():
            reasons.append(f"{name}: the package has no {entry.artifact}")
            continue
        try:
            return _open(name, package, precision, options)
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
        return bool(entry.on_gpu())
    except ImportError:
        return False  # not installed: _open says so when its turn comes


def _open(
    name: str, package: ModelPackage, precision: Precision | None, options: dict[str, Any]
) -> Runner:
    entry = RUNNERS[name]
    try:
        runner_class = getattr(importlib.import_module(entry.module), entry.class_name)
    except ImportError as error:
        missing = error.name or error
        raise RunnerError(
            f"the {name} engine needs {missing}: install musc-edge with the {entry.extra} extra"
        ) from None
    taken = {key: value for key, value in options.items() if key in entry.options}
    return runner_class(package, precision, **taken)
