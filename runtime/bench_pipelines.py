"""The two pipelines `musc-edge bench` compares on the same images.

Ours: the package's engine (TensorRT, ONNX Runtime or torch) and the custom ops at the chosen
precision. Reference: what the original MuSc does: the torch backbone in float32, the plain
LNAMD and the per-image cdist MSM in float32.
"""

from __future__ import annotations

from musc_edge.musc import MuSc
from musc_edge.ops.original import original_msm
from musc_edge.package import ModelPackage
from musc_edge.runtime.benchmark import Pipeline
from musc_edge.runtime.runners import open_runner


def line_pipeline(package: ModelPackage, engine: str, precision: str) -> Pipeline:
    runner = open_runner(package, engine, allow_random_init=True)
    musc = MuSc(package.musc["r_list"], package.musc["frac"], package.musc["k_list"], precision)
    return Pipeline(f"musc-edge {runner.description}", package.preprocessing(), runner, musc,
                    musc.mutual_scores, package.max_batch)


def reference_pipeline(package: ModelPackage) -> Pipeline:
    """Random-weight packages rebuild the same weights from the export seed (see export)."""
    runner = open_runner(package, "torch", allow_random_init=True)
    musc = MuSc(package.musc["r_list"], package.musc["frac"], package.musc["k_list"], "fp32",
                backend="reference")
    frac = package.musc["frac"]
    return Pipeline("original (torch fp32 + cdist MSM)", package.preprocessing(), runner, musc,
                    lambda z: original_msm(z, frac), package.max_batch)
