"""Build a package's TensorRT engine from its ONNX graph, on the GPU that will run it.

An engine only runs on the GPU model (compute capability) and TensorRT version it was built
with, so it is built where it runs: by `musc-edge export` when the workstation has TensorRT
and a GPU, otherwise by `musc-edge engine build` on the device. This module imports only the
core, numpy, torch and (lazily) TensorRT, so a device needs neither onnx nor the model zoo.

Written against TensorRT 10's documented Python API (Builder, OnnxParser, BuilderConfig,
optimisation profiles, timing cache). No GPU or TensorRT was available where it was written:
the build and the engine parity check are unverified (docs/export.md).
"""

from __future__ import annotations

import dataclasses
import enum
import os
import shutil
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from musc_edge.errors import MuscEdgeError, UsageError
from musc_edge.package import (
    ENGINE_FILE,
    INPUT_NAME,
    ONNX_FILE,
    PARITY_REFERENCE_FILE,
    ModelPackage,
    PackageError,
    compare_outputs,
    record_parity,
)
from musc_edge.size import ImageSize

TIMING_CACHE_FILE = "timing.cache"  # tactic timings: rebuilds on the same GPU go faster
MIN_TENSORRT_MAJOR = 10
# Largest max_rel (see package.compare_outputs) an engine should show against the torch
# model: first estimates, not yet measured on a GPU. fp32 builds run with TF32 off.
ENGINE_TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2}


class EnginePrecision(str, enum.Enum):
    """What the engine computes in; fp16 keeps normalisations and reductions in fp32."""

    fp16 = "fp16"
    fp32 = "fp32"


class EngineBuildError(MuscEdgeError, RuntimeError):
    """TensorRT could not build a sound engine; the message says why."""


def engine_support() -> str | None:
    """Why no engine can be built here, or None when TensorRT and a CUDA GPU are present."""
    try:
        import tensorrt as trt
    except ImportError:
        return "TensorRT is not installed here (on the device: pip install tensorrt, or JetPack's)"
    if not hasattr(trt, "__version__"):  # e.g. only the tensorrt-stubs type stubs
        return "the `tensorrt` found here is not a TensorRT installation (type stubs only?)"
    if int(trt.__version__.split(".")[0]) < MIN_TENSORRT_MAJOR:
        return f"TensorRT {trt.__version__} is too old; engines need TensorRT 10 or newer"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    return None


def profile_shapes(image_size: ImageSize | int, max_batch: int) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) input shapes of the optimisation profile: any batch from 1 to
    max_batch, kernels tuned for full batches, which the line runtime sends under load."""
    if max_batch < 1:
        raise UsageError(f"max batch must be at least 1, got {max_batch}")
    size = ImageSize.parse(image_size).hw
    single = (1, 3, *size)
    full = (max_batch, 3, *size)
    return single, full, full


def configure_precision(trt, network, config, precision: str) -> int:
    """Set the builder's precision flags; returns how many layers were pinned to fp32.

    fp32 clears TF32, so that fp32 means fp32. fp16 pins every normalisation layer (the ONNX
    LayerNormalization nodes) and reduction (the embedding's L2 norm) to fp32, with
    OBEY_PRECISION_CONSTRAINTS, because their sums of squares overflow fp16 (max 65504) on
    ViT activations. The attention softmax is left to TensorRT's fused attention kernels,
    which accumulate in fp32; pinning it would break that fusion.
    """
    if precision == EnginePrecision.fp32:
        if hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)
        return 0
    if not hasattr(trt.BuilderFlag, "FP16"):
        raise EngineBuildError(
            f"TensorRT {trt.__version__} builds only strongly typed networks (no FP16 builder "
            "flag): an fp16 engine would need an fp16 ONNX graph, which export does not write "
            "yet; build with --precision fp32, or use TensorRT 10"
        )
    config.set_flag(trt.BuilderFlag.FP16)
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    pinned = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type in (trt.LayerType.NORMALIZATION, trt.LayerType.REDUCE):
            layer.precision = trt.float32
            for output in range(layer.num_outputs):
                layer.set_output_type(output, trt.float32)
            pinned += 1
    return pinned


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    image_size: ImageSize,
    precision: str,
    max_batch: int,
    timing_cache: Path,
) -> dict:
    """Parse the graph, build the engine, write it; returns its musc.json `engine` record."""
    import tensorrt as trt

    from musc_edge.runtime.tensorrt_runner import current_platform

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: always explicit batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # also reads external data beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    shapes = profile_shapes(image_size, max_batch)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, *shapes)
    config.add_optimization_profile(profile)
    pinned = configure_precision(trt, network, config, precision)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        cache = config.create_timing_cache(b"")  # another GPU's or TensorRT's cache: start over
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT could not build an engine from {onnx_path}; see above")
    engine_path.write_bytes(serialized)
    timing_cache.write_bytes(config.get_timing_cache().serialize())
    return {
        **current_platform(),
        "precision": precision,
        "max_batch": max_batch,
        "profile": dict(zip(("min", "opt", "max"), map(list, shapes), strict=True)),
        "fp32_layers": pinned,
        "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def engine_parity(package: ModelPackage, reference_file: Path) -> dict:
    """parity.json's tensorrt entry: the engine against the torch outputs stored at export.

    The stored image runs alone and repeated max_batch times, both ends of the profile.
    """
    from musc_edge.runtime.tensorrt_runner import TensorRTRunner

    with np.load(reference_file) as stored:
        image = stored[INPUT_NAME]
        reference = {name: stored[name] for name in package.output_names}
    runner = TensorRTRunner(package)
    runs = []
    for batch_size in (1, package.max_batch):
        tokens, embedding = runner(np.repeat(image, batch_size, axis=0))
        runs.append([t.float().cpu().numpy() for t in (*tokens, embedding)])
    outputs = {
        name: np.concatenate(parts)
        for name, *parts in zip(package.output_names, *runs, strict=True)
    }
    repeated = {
        name: np.repeat(ref, 1 + package.max_batch, axis=0) for name, ref in reference.items()
    }
    return compare_outputs(
        repeated,
        outputs,
        ENGINE_TOLERANCE[package.precision],
        precision=package.precision,
        gpu=package.engine["gpu"],
        batches=[1, package.max_batch],
    )


def build_package_engine(
    package: ModelPackage, precision: str, max_batch: int, on_stage: Callable[[str], None]
) -> dict:
    """Build, check and install the package's engine; returns its parity entry.

    The engine is built and checked in a scratch folder first and musc.json is rewritten
    last, atomically: a failed or interrupted build leaves the package as it was. An engine
    with NaN or inf outputs is refused; one merely outside the tolerance is installed, and
    its parity entry says passed: false.
    """
    if PARITY_REFERENCE_FILE not in package.artifacts:
        raise PackageError(f"{package.folder} has no {PARITY_REFERENCE_FILE}; export it again")
    precision = EnginePrecision(precision).value
    scratch = package.path(".engine-build")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        on_stage(f"building the TensorRT engine ({precision}, batch 1..{max_batch})")
        record = build_engine(
            package.path(ONNX_FILE),
            scratch / ENGINE_FILE,
            package.size,
            precision,
            max_batch,
            package.path(TIMING_CACHE_FILE),
        )
        trial = dataclasses.replace(
            package, folder=scratch, precision=precision, max_batch=max_batch, engine=record
        )
        on_stage("checking the engine against the torch reference")
        parity = engine_parity(trial, package.path(PARITY_REFERENCE_FILE))
        if not np.isfinite(parity["max_rel"]):
            raise EngineBuildError(
                f"the {precision} engine outputs NaN or inf (fp16 overflow?); "
                "build with --precision fp32"
            )
        os.replace(scratch / ENGINE_FILE, package.path(ENGINE_FILE))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    package.precision, package.max_batch, package.engine = precision, max_batch, record
    package.record_artifact(ENGINE_FILE)
    record_parity(package.folder, "tensorrt", parity)
    package.write()
    return parity
