"""Engine runners: choosing one, refusing what cannot run here, and what each one returns."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from musc_edge.errors import UsageError
from musc_edge.package import ENGINE_FILE, PackageError
from musc_edge.runtime.engine_check import check_engine
from musc_edge.runtime.runners import RUNNERS, RunnerError, _runs_on_gpu, open_runner
from musc_edge.runtime.torch_runner import weights_arguments
from tests.helpers import PooledColours, write_package

HERE = {"gpu": "NVIDIA Jetson AGX Orin", "compute_capability": "8.7", "tensorrt": "10.3.0"}


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
    assert runner.last_ms is not None and runner.last_ms > 0


def test_runner_options_reach_only_the_runners_that_take_them(tmp_path: Path) -> None:
    package = write_package(tmp_path / "pkg", weights_source="random-init", layers=[1, 2])
    with pytest.raises(UsageError, match="no engine takes the option allow_randm_init"):
        open_runner(package, "torch", allow_randm_init=True)
    # An engine that does not take it never sees it: the missing graph is what stops it.
    with pytest.raises(PackageError, match=r"has no backbone\.onnx"):
        open_runner(package, "onnxruntime", allow_random_init=True)
    assert open_runner(package, "auto", allow_random_init=True).name == "torch"
    # Built directly, a runner refuses an option it does not take, before loading anything.
    from musc_edge.runtime.onnx_runner import OnnxRuntimeRunner

    with pytest.raises(UsageError, match=r"onnxruntime engine takes no option allow_random_init"):
        OnnxRuntimeRunner(package, allow_random_init=True)


def test_the_registry_lists_each_runner_options_and_gpu_probe() -> None:
    for name, entry in RUNNERS.items():
        assert isinstance(entry.on_gpu, bool) or callable(entry.on_gpu), name
        try:
            runner_class = getattr(importlib.import_module(entry.module), entry.class_name)
        except ImportError:
            continue  # not installed here
        assert runner_class.options == entry.options, name
        assert runner_class.name == name


def test_the_gpu_probe_imports_onnxruntime_only_when_asked(monkeypatch) -> None:
    script = (
        "import sys\n"
        "from musc_edge.runtime import runners\n"
        "assert 'onnxruntime' not in sys.modules\n"
        "sys.modules['onnxruntime'] = None  # as on a device without it\n"
        "assert runners.auto_order()[-1] == 'torch'\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.delitem(sys.modules, "musc_edge.runtime.onnx_runner", raising=False)
    assert _runs_on_gpu(RUNNERS["onnxruntime"]) is False


def test_every_batch_is_checked_once_and_timed(tmp_path: Path) -> None:
    package = write_package(tmp_path / "pkg", image_size=56, max_batch=4)
    runner = PooledColours(package)
    assert runner.last_ms is None
    _, embedding = runner(np.zeros((5, 3, 56, 56), np.float32))
    assert tuple(embedding.shape) == (5, 32) and runner.last_ms >= 0
    expected = r"takes a float32 numpy array of shape \(B, 3, 56, 56\) with B >= 1, not "
    wrong = {
        r"a float64 array of shape \(2, 3, 56, 56\)": np.zeros((2, 3, 56, 56)),
        r"a float32 array of shape \(2, 3, 64, 64\)": np.zeros((2, 3, 64, 64), np.float32),
        r"a float32 array of shape \(0, 3, 56, 56\)": np.zeros((0, 3, 56, 56), np.float32),
        r"a float32 array of shape \(3, 56, 56\)": np.zeros((3, 56, 56), np.float32),
        "list": [np.zeros((3, 56, 56), np.float32)],
    }
    for given, batch in wrong.items():
        with pytest.raises(ValueError, match=expected + given):
            runner(batch)

    class Bounded(PooledColours):
        batch_limited = True  # as a TensorRT engine's profile

    bounded = Bounded(package)
    bounded(np.zeros((4, 3, 56, 56), np.float32))
    with pytest.raises(ValueError, match=r"\(B, 3, 56, 56\) with B from 1 to 4, not .*\(5, 3,"):
        bounded(np.zeros((5, 3, 56, 56), np.float32))
