"""Engine runners: choosing one, refusing what cannot run here, and what each one returns."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from musc_edge.images import Preprocess
from musc_edge.package import ENGINE_FILE, ModelPackage, PackageError
from musc_edge.runtime.engine_check import check_engine
from musc_edge.runtime.runners import RunnerError, open_runner
from musc_edge.runtime.torch_runner import weights_arguments

HERE = {"gpu": "NVIDIA Jetson AGX Orin", "compute_capability": "8.7", "tensorrt": "10.3.0"}


def write_package(folder: Path, **changes) -> ModelPackage:
    """A package manifest without artifacts: enough for the torch runner and the line."""
    folder.mkdir(parents=True, exist_ok=True)
    package = ModelPackage(
        backbone="dinov2-vits14",
        weights_source="fetched:dinov2-vits14",
        weights_sha256=None,
        image_size=56,
        patch_size=14,
        layers=[3, 6, 9, 12],
        token_dim=384,
        embedding_dim=384,
        preprocess=Preprocess(56, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).to_dict(),
        precision="fp32",
        max_batch=4,
        musc={"r_list": [1, 3, 5], "frac": 0.3, "k_list": [1, 2, 3], "precision": "fp32"},
        versions={},
        folder=folder,
    )
    package = dataclasses.replace(package, **changes)
    package.write()
    return package


def test_onnxruntime_providers_in_order_tensorrt_cuda_cpu() -> None:
    from musc_edge.runtime.onnx_runner import choose_providers

    offered = ["CPUExecutionProvider", "AzureExecutionProvider", "CUDAExecutionProvider"]
    assert choose_providers(offered) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    offered.append("TensorrtExecutionProvider")
    assert choose_providers(offered)[0] == "TensorrtExecutionProvider"


def test_onnxruntime_threads_stay_within_the_cores_this_process_may_use() -> None:
    from musc_edge.parallel import physical_cores
    from musc_edge.runtime.onnx_runner import session_options

    assert 1 <= physical_cores() <= len(os.sched_getaffinity(0))
    assert session_options().intra_op_num_threads == physical_cores()


def test_engine_for_another_platform_is_refused_naming_what_differs(tmp_path: Path) -> None:
    package = write_package(tmp_path / "pkg", engine={**HERE, "compute_capability": "8.6"})
    check_engine(dataclasses.replace(package, engine=dict(HERE)), HERE)
    with pytest.raises(RunnerError, match=r"compute_capability '8.6' \(here '8.7'\)") as error:
        check_engine(package, HERE)
    assert "gpu" not in str(error.value).split("platform:")[1].split(";")[0]
    newer = {**HERE, "tensorrt": "10.7.0"}
    with pytest.raises(
        RunnerError, match=r"tensorrt '10\.3\.0' \(here '10\.7\.0'\); rebuild it on this device"
    ):
        check_engine(dataclasses.replace(package, engine=dict(HERE)), newer)
    with pytest.raises(RunnerError, match="gpu None"):
        check_engine(dataclasses.replace(package, engine=None), HERE)


def test_weights_source_maps_to_create_backbone_arguments(tmp_path: Path) -> None:
    package = write_package(tmp_path / "pkg")
    assert weights_arguments(package, False) == {}
    local = dataclasses.replace(package, weights_source="file:weights.safetensors")
    assert weights_arguments(local, False) == {"weights": tmp_path / "pkg" / "weights.safetensors"}
    absolute = dataclasses.replace(package, weights_source="file:/w/v.pt")
    assert weights_arguments(absolute, False) == {"weights": Path("/w/v.pt")}
    random = dataclasses.replace(package, weights_source="random-init")
    with pytest.raises(PackageError, match=r"random weights.*--allow-random-init"):
        weights_arguments(random, False)
    assert weights_arguments(random, True) == {"random_init": True}
    other = dataclasses.replace(package, weights_source="fetched:dinov2-vitb14")
    with pytest.raises(PackageError, match="does not belong"):
        weights_arguments(other, False)


def test_explicit_engines_say_what_is_missing(tmp_path: Path) -> None:
    package = write_package(tmp_path / "pkg")
    with pytest.raises(ValueError, match="unknown engine 'tflite'"):
        open_runner(package, "tflite")
    with pytest.raises(PackageError, match=r"has no backbone\.onnx"):
        open_runner(package, "onnxruntime")
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(
            RunnerError, match="needs tensorrt: install musc-edge with the tensorrt extra"
        ):
            open_runner(package, "tensorrt")


def test_auto_lists_why_each_engine_was_passed_over(tmp_path: Path) -> None:
    package = write_package(tmp_path / "pkg", weights_source="random-init")
    with pytest.raises(RunnerError) as error:
        open_runner(package, "auto")
    message = str(error.value)
    assert f"tensorrt: the package has no {ENGINE_FILE}" in message
    assert "openvino: the package has no backbone.onnx" in message
    assert "onnxruntime: the package has no backbone.onnx" in message
    assert "torch:" in message and "random weights" in message


def test_torch_runner_builds_the_package_backbone(tmp_path: Path) -> None:
    package = write_package(tmp_path / "pkg", weights_source="random-init", layers=[2, 4])
    runner = open_runner(package, "torch", allow_random_init=True)
    assert runner.name == "torch" and "random-init" in runner.description
    tokens, embedding = runner(np.zeros((2, 3, 56, 56), np.float32))
    assert [tuple(t.shape) for t in tokens] == [(2, 16, 384)] * 2
    assert tuple(embedding.shape) == (2, 384)
