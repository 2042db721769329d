"""TensorRT runner: the package's backbone.engine, with torch CUDA tensors as I/O buffers.

Written against TensorRT 10's documented Python API (named I/O tensors, execute_async_v3).
No GPU or TensorRT is available where this was written: this path is unverified here.
"""

from __future__ import annotations

import numpy as np
import tensorrt as trt
import torch

from musc_edge.package import ENGINE_FILE, PackageError
from musc_edge.precision import Precision
from musc_edge.runtime.engine_check import check_engine
from musc_edge.runtime.runners import Runner, RunnerError


def current_platform() -> dict[str, str]:
    """What an engine must have been built for to run here: GPU, compute capability, TRT."""
    major, minor = torch.cuda.get_device_capability()
    return {
        "gpu": torch.cuda.get_device_name(),
        "compute_capability": f"{major}.{minor}",
        "tensorrt": trt.__version__,
    }


_DTYPES = {
    trt.float32: torch.float32,
    trt.float16: torch.float16,
    trt.bfloat16: torch.bfloat16,
    trt.int32: torch.int32,
}


class TensorRTRunner(Runner):
    name = "tensorrt"

    precisions = tuple(Precision)  # the engine's own: chosen when it was built

    batch_limited = True  # the engine's optimisation profile ends at package.max_batch

    def default_precision(self) -> Precision:
        return Precision(self.package.precision)

    def load(self) -> None:
        package = self.package
        built = self.default_precision()
        if self.precision is not built:
            raise RunnerError(
                f"{package.folder}'s engine was built for {built.value}; rebuild it with "
                f"--engine-precision {self.precision.value} to run the backbone in "
                f"{self.precision.value}"
            )
        if not torch.cuda.is_available():
            raise RunnerError("TensorRT needs a CUDA device and torch sees none")
        path = package.path(ENGINE_FILE)
        if not path.is_file():
            raise PackageError(f"{package.folder} has no {ENGINE_FILE}; build it on this device")
        here = current_platform()
        check_engine(package, here)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RunnerError(f"TensorRT {here['tensorrt']} could not load {path}; rebuild it")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if len(inputs) != 1:
            raise PackageError(f"{path} has inputs {inputs}; expected one image input")
        self.input_name = inputs[0]
        self.outputs = package.output_names
        missing = [name for name in self.outputs if name not in names]
        if missing:
            raise PackageError(f"{path} lacks the outputs {missing} that musc.json names")
        self.description = f"TensorRT {here['tensorrt']} on {here['gpu']}"

    @torch.no_grad()
    def infer_impl(self, batch: np.ndarray) -> tuple[list[torch.Tensor], torch.Tensor]:
        images = torch.from_numpy(batch).cuda()
        self.context.set_input_shape(self.input_name, tuple(images.shape))
        self.context.set_tensor_address(self.input_name, images.data_ptr())
        results = []
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = _DTYPES[self.engine.get_tensor_dtype(name)]
            results.append(torch.empty(shape, dtype=dtype, device="cuda"))
            self.context.set_tensor_address(name, results[-1].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RunnerError(
                "TensorRT execution failed; rebuild the engine or use --engine onnxruntime"
            )
        stream.synchronize()
        *tokens, embedding = results
        return tokens, embedding
