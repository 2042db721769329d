"""`export_package`: a backbone -> a verified, self-describing model package folder.

Order of work: torch reference outputs on the parity images, ONNX export, onnx.checker and
a comparison of the graph's tensors with the manifest, ONNX Runtime parity, then the
TensorRT engine where this machine can build one. Everything happens in a staging folder
that replaces the target only when all of it succeeded.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np

from musc_edge.export.onnx_export import OPSET, ExportError, check_onnx, export_onnx
from musc_edge.export.parity import onnxruntime_parity, parity_images, torch_outputs
from musc_edge.export.staging import staged_folder
from musc_edge.models import Backbone
from musc_edge.package import (
    EMBEDDING_NAME,
    INPUT_NAME,
    ONNX_FILE,
    PARITY_FILE,
    PARITY_REFERENCE_FILE,
    ModelPackage,
    record_parity,
    tensor_names,
)
from musc_edge.runtime.engine_builder import build_package_engine, engine_support
from musc_edge.size import ImageSize

# Distributions whose versions decide what the package holds; None where not installed.
RECORDED_VERSIONS = (
    "musc-edge",
    "torch",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "tensorrt",
    "open_clip_torch",
    "timm",
)


@dataclass
class ExportResult:
    package: ModelPackage
    parity: dict  # the content of parity.json
    engine_skipped: str | None  # why no engine was built here, None when one was


def default_folder(backbone: str, image_size: ImageSize) -> Path:
    """packages/BACKBONE-SIZE in the working folder: outside the source tree."""
    return Path("packages") / f"{backbone}-{image_size}"


def tool_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in RECORDED_VERSIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def export_package(
    backbone: Backbone,
    folder: Path,
    *,
    musc_settings: dict,
    precision: str,
    max_batch: int,
    parity_dir: Path | None,
    force: bool,
    on_stage: Callable[[str], None],
) -> ExportResult:
    """Write the package for `backbone` to `folder` (replacing one only with `force`)."""
    names = [*tensor_names(list(backbone.layers)), EMBEDDING_NAME]
    with staged_folder(folder, force) as staging:
        on_stage("running the torch model on the parity images")
        batch, source, files = parity_images(backbone.preprocess, parity_dir)
        reference = torch_outputs(backbone, batch, names)
        package = ModelPackage(
            backbone=backbone.spec.name,
            weights_source=backbone.weights.source,
            weights_sha256=backbone.weights.sha256,
            image_size=backbone.image_size.to_json(),
            patch_size=backbone.spec.patch_size,
            layers=list(backbone.layers),
            token_dim=int(reference[names[0]].shape[-1]),
            embedding_dim=int(reference[EMBEDDING_NAME].shape[-1]),
            preprocess=backbone.preprocess.to_dict(),
            precision=precision,
            max_batch=max_batch,
            musc=musc_settings,
            versions=tool_versions(),
            onnx_opset=OPSET,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            folder=staging,
        )
        on_stage("exporting the ONNX graph")
        graph_files = export_onnx(backbone, staging / ONNX_FILE, names)
        on_stage("checking the ONNX graph")
        check_onnx(staging / ONNX_FILE, package)
        on_stage("comparing ONNX Runtime with torch")
        onnxruntime = onnxruntime_parity(staging / ONNX_FILE, batch, reference)
        if not onnxruntime["passed"]:
            raise ExportError(
                f"ONNX Runtime differs from torch by {onnxruntime['max_rel']:.2e} (relative), "
                f"more than {onnxruntime['tolerance']:.0e}: {onnxruntime['outputs']}"
            )
        np.savez(
            staging / PARITY_REFERENCE_FILE,
            **{INPUT_NAME: batch[:1]},
            **{name: values[:1] for name, values in reference.items()},
        )
        images = {"source": source, "files": files, "reference": "torch fp32, CPU"}
        record_parity(staging, "images", images)
        record_parity(staging, "onnxruntime", onnxruntime)
        on_stage("hashing the artifacts")
        for name in (*graph_files, PARITY_REFERENCE_FILE):
            package.record_artifact(name)
        package.write()
        skipped = engine_support()
        if skipped is None:
            build_package_engine(package, precision, max_batch, on_stage)
        else:
            record_parity(staging, "tensorrt", {"skipped": skipped})
        parity = json.loads((staging / PARITY_FILE).read_text())
        on_stage("moving the package into place")
    package.folder = folder
    return ExportResult(package, parity, skipped)
