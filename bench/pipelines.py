"""The two pipelines `musc-edge bench` compares on the same images.

Ours: the package's engine (TensorRT, ONNX Runtime or torch) and the default MSM backend (the
custom op) at the chosen precision. Original: what the original MuSc does: the torch backbone
in float32, plain LNAMD and the per-image cdist MSM in float32. Both score through `MuSc`.
"""

from __future__ import annotations

from musc_edge.bench.stages import Pipeline
from musc_edge.musc import MuSc
from musc_edge.package import ModelPackage
from musc_edge.precision import Precision
from musc_edge.runtime.runners import open_runner


def line_pipeline(
    package: ModelPackage, engine: str, backbone_precision: Precision | None, msm_precision: str
) -> Pipeline:
    runner = open_runner(package, engine, allow_random_init=True, precision=backbone_precision)
    musc = MuSc.for_package(package, msm_precision)
    return Pipeline(
        f"musc-edge {runner.description}", package.preprocessing(), runner, musc, package.max_batch
    )


def original_pipeline(package: ModelPackage) -> Pipeline:
    """Random-weight packages rebuild the same weights from the export seed (see export)."""
    runner = open_runner(package, "torch", allow_random_init=True)
    musc = MuSc.for_package(package, "fp32", backend="original", pooling="plain")
    return Pipeline(
        "original (torch fp32 + cdist MSM)",
        package.preprocessing(),
        runner,
        musc,
        package.max_batch,
    )
