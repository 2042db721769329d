"""ONNX Runtime runner: the package's backbone.onnx on the best execution provider present."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from musc_edge.parallel import physical_cores
from musc_edge.runtime.runners import Runner

PREFERRED_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)


def choose_providers(available: list[str]) -> list[str]:
    """TensorRT, then CUDA, then CPU, keeping only those this onnxruntime build offers."""
    return [name for name in PREFERRED_PROVIDERS if name in available]


def runs_on_gpu() -> bool:
    """Whether this onnxruntime build has a GPU provider (the registry's `on_gpu` probe)."""
    return choose_providers(ort.get_available_providers())[0] != "CPUExecutionProvider"


def session_options() -> ort.SessionOptions:
    """ONNX Runtime's defaults (all graph optimisations, sequential, memory arena and
    patterns) are its fastest here, measured in docs/cpu-runners.md; only the threads change."""
    options = ort.SessionOptions()
    # ORT's default counts every physical core of the machine and pins a thread to each,
    # outside the process's CPU mask (seen: a worker on CPU 1 under `taskset -c 0`).
    options.intra_op_num_threads = physical_cores()
    return options


class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"

    def load(self) -> None:
        path = self.onnx_path()
        providers = choose_providers(ort.get_available_providers())
        self.session = ort.InferenceSession(str(path), session_options(), providers=providers)
        self.outputs = self.package.output_names
        self.check_outputs(path, (output.name for output in self.session.get_outputs()))
        self.input_name = self.session.get_inputs()[0].name
        used = ", ".join(self.session.get_providers())
        self.description = f"onnxruntime {ort.__version__} ({used})"

    def infer_impl(self, batch: np.ndarray) -> tuple[list[torch.Tensor], torch.Tensor]:
        *tokens, embedding = self.session.run(self.outputs, {self.input_name: batch})
        return [torch.from_numpy(layer) for layer in tokens], torch.from_numpy(embedding)
