"""OpenVINO runner: the package's backbone.onnx compiled for the CPU.

On x86 CPUs it beats ONNX Runtime's CPU provider in fp32 and runs bf16 natively (AVX512-BF16,
AMX), which ONNX Runtime cannot; docs/cpu-runners.md has the measurements.
"""

from __future__ import annotations

import numpy as np
import openvino as ov
import torch

from musc_edge.package import PackageError
from musc_edge.precision import Precision
from musc_edge.runtime.runners import Runner, RunnerError

DEVICE = "CPU"
# OpenVINO's names for the precisions; always set, because on a CPU with bf16 OpenVINO's
# default is bf16, which would change fp32 results without saying so.
INFERENCE_PRECISION = {Precision.fp32: ov.Type.f32, Precision.bf16: ov.Type.bf16}
# LATENCY: one stream on all cores. THROUGHPUT splits the cores into streams that only pay
# off with several requests in flight; the line runs one batch at a time (measured: 1.7-1.8x
# slower at batch 8 on 2 cores).
PERFORMANCE_MODE = ov.properties.hint.PerformanceMode.LATENCY


def plugin_runs_bf16(core: ov.Core) -> bool:
    """Whether OpenVINO's CPU plugin runs bf16 here (it lists BF16 in its capabilities): its
    own kernels' view, which `musc_edge.precision.cpu_has_bf16` (the CPU flags) cannot give."""
    return "BF16" in core.get_property(DEVICE, ov.properties.device.capabilities)


def reason(error: Exception) -> str:
    """OpenVINO's message without its "Exception from src/...cpp:N:" trace lines."""
    lines = [line.strip() for line in str(error).splitlines()]
    said = [line for line in lines if line and not line.startswith("Exception from ")]
    return said[0] if said else type(error).__name__


class OpenVinoRunner(Runner):
    """One compiled model and one infer request: call it from one thread at a time, as the
    line does."""

    name = "openvino"
    precisions = (Precision.fp32, Precision.bf16)

    def load(self) -> None:
        path = self.onnx_path()
        core = ov.Core()
        if self.precision is Precision.bf16 and not plugin_runs_bf16(core):
            raise RunnerError(
                "OpenVINO finds no bf16 support on this CPU (needs AVX512-BF16 or AMX); "
                "use --backbone-precision fp32"
            )
        wanted = INFERENCE_PRECISION[self.precision]
        config = {
            ov.properties.hint.inference_precision: wanted,
            ov.properties.hint.performance_mode: PERFORMANCE_MODE,
        }
        try:
            self.compiled = core.compile_model(str(path), DEVICE, config)
        except RuntimeError as error:
            raise PackageError(
                f"OpenVINO cannot compile {path}: {reason(error)}; export the package again"
            ) from None
        used = self.compiled.get_property(ov.properties.hint.inference_precision)
        if used != wanted:  # never run in another precision than the one reported
            raise RunnerError(
                f"OpenVINO compiled {path} in {used.to_string()}, not the "
                f"{self.precision.value} asked for; choose another --engine"
            )
        ports = {name: port for port in self.compiled.outputs for name in port.get_names()}
        self.outputs = self.package.output_names
        self.check_outputs(path, ports)
        self.ports = [ports[name] for name in self.outputs]
        self.request = self.compiled.create_infer_request()  # reused: no per-call allocation
        threads = self.compiled.get_property(ov.properties.inference_num_threads)
        version = ov.__version__.split("-")[0]
        self.description = (
            f"openvino {version} ({DEVICE}, {self.precision.value}, {threads} threads)"
        )

    def infer_impl(self, batch: np.ndarray) -> tuple[list[torch.Tensor], torch.Tensor]:
        # share_outputs=False (the default): OpenVINO copies each output out of the request's
        # buffers, which the next call overwrites, so the tensors returned stay valid.
        results = self.request.infer({0: batch})
        *tokens, embedding = (torch.from_numpy(results[port]) for port in self.ports)
        return tokens, embedding
