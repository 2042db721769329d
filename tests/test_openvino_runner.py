"""The OpenVINO runner on a real exported package: fp32 features as ONNX Runtime's, bf16 close
to them (or refused where the CPU lacks it), the errors that say what to do, and the order in
which `--engine auto` tries the engines.

Tolerances, measured on 6 bottle images with dinov2-vits14 at 224 (OpenVINO 2026.4, ONNX
Runtime 1.32, AVX512-BF16 CPU): fp32 differs from ONNX Runtime by 1.4e-6 relative (norm of the
difference over the norm) and 5e-6 at the worst element relative to the output's largest;
bf16 by 7.6e-3 relative, as torch's bf16 does.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from musc_edge.images import read_image
from musc_edge.musc import MuSc
from musc_edge.package import ONNX_FILE, ModelPackage, PackageError, compare_outputs, load_package
from musc_edge.precision import Precision
from musc_edge.runtime import onnx_runner
from musc_edge.runtime.runners import RunnerError, auto_order, open_runner
from tests.helpers import relative_error, write_package

needs_openvino = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None,
    reason="openvino is not installed (pip install musc-edge[openvino])",
)
FP32_TOLERANCE = 1e-4  # the export's parity tolerance; measured 5e-6
BF16_TOLERANCE = 0.03  # relative error; measured 7.6e-3


@pytest.fixture(scope="module")
def package(vits14_package: Path) -> ModelPackage:
    return load_package(vits14_package)


@pytest.fixture(scope="module")
def batch(bottle_dir: Path, package: ModelPackage) -> np.ndarray:
    """6 bottle test images, 3 good and 3 contaminated."""
    good = sorted((bottle_dir / "test" / "good").glob("*.png"))[:3]
    bad = sorted((bottle_dir / "test" / "contamination").glob("*.png"))[:3]
    preprocess = package.preprocessing()
    return np.stack([preprocess(read_image(path)) for path in good + bad])


def as_arrays(package: ModelPackage, features) -> dict[str, np.ndarray]:
    tokens, embedding = features
    arrays = [*map(np.asarray, tokens), np.asarray(embedding)]
    return dict(zip(package.output_names, arrays, strict=True))


def openvino_has_bf16() -> bool:
    import openvino

    from musc_edge.runtime.openvino_runner import plugin_runs_bf16

    return plugin_runs_bf16(openvino.Core())


@needs_openvino
def test_fp32_features_match_onnxruntime(package: ModelPackage, batch: np.ndarray) -> None:
    runner = open_runner(package, "openvino", precision="fp32")
    assert runner.precision is Precision.fp32 and "fp32" in runner.description
    reference = open_runner(package, "onnxruntime")
    ours = runner(batch)
    assert all(t.dtype == torch.float32 for t in (*ours[0], ours[1]))
    parity = compare_outputs(as_arrays(package, reference(batch)), as_arrays(package, ours), 0)
    assert parity["max_rel"] < FP32_TOLERANCE, parity
    first = ours[1].clone()
    partial = runner(batch[:2])  # another batch size, through the same request
    assert tuple(partial[1].shape) == (2, package.embedding_dim)
    assert torch.equal(ours[1], first)  # the outputs are copies, not the request's buffers
    assert relative_error(partial[1], first[:2]) < 1e-5


@needs_openvino
def test_bf16_is_close_to_fp32_or_refused(package: ModelPackage, batch: np.ndarray) -> None:
    if not openvino_has_bf16():
        with pytest.raises(RunnerError, match="no bf16 support on this CPU"):
            open_runner(package, "openvino", precision="bf16")
        return
    runner = open_runner(package, "openvino", precision="bf16")
    assert runner.precision is Precision.bf16 and "bf16" in runner.description
    exact_tokens, exact_embedding = open_runner(package, "openvino", precision="fp32")(batch)
    tokens, embedding = runner(batch)
    assert all(layer.dtype == torch.float32 for layer in tokens)
    errors = [relative_error(a, b) for a, b in zip(tokens, exact_tokens, strict=True)]
    assert max(errors) < BF16_TOLERANCE and min(errors) > 1e-4  # really bf16, and close
    assert relative_error(embedding, exact_embedding) < BF16_TOLERANCE
    exact = MuSc().score(exact_tokens, exact_embedding).scores
    ours = MuSc().score(tokens, embedding).scores
    assert torch.equal(ours.argsort(), exact.argsort()) or float((ours - exact).abs().max()) < 0.02


@needs_openvino
def test_bf16_is_refused_on_a_cpu_without_it(package: ModelPackage, monkeypatch) -> None:
    from musc_edge.runtime import openvino_runner

    monkeypatch.setattr(openvino_runner, "plugin_runs_bf16", lambda core: False)
    with pytest.raises(RunnerError, match=r"no bf16 support.*--backbone-precision fp32"):
        open_runner(package, "openvino", precision="bf16")


@needs_openvino
def test_outputs_the_manifest_names_must_be_in_the_graph(
    package: ModelPackage, tmp_path: Path
) -> None:
    other = write_package(tmp_path / "pkg", image_size=224, layers=[*package.layers, 11])
    other.path(ONNX_FILE).symlink_to(package.path(ONNX_FILE))
    with pytest.raises(PackageError, match=r"lacks the outputs \['tokens_11'\].*export again"):
        open_runner(other, "openvino")


@needs_openvino
def test_a_graph_openvino_cannot_read_is_a_package_error(tmp_path: Path) -> None:
    package = write_package(tmp_path / "pkg", weights_source="random-init", layers=[1, 2])
    package.path(ONNX_FILE).write_bytes(b"not an onnx graph")
    with pytest.raises(PackageError, match=r"OpenVINO cannot compile .*export the package again"):
        open_runner(package, "openvino")


@needs_openvino
def test_auto_prefers_openvino_on_a_cpu(package: ModelPackage, monkeypatch) -> None:
    """GPU engines first, then the CPU engines in the registry's measured order."""
    if not onnx_runner.runs_on_gpu():
        assert auto_order() == ["tensorrt", "openvino", "onnxruntime", "torch"]
        assert open_runner(package, "auto").name == "openvino"
        if openvino_has_bf16():
            assert open_runner(package, "auto", precision="bf16").name == "openvino"
    monkeypatch.setattr(onnx_runner, "runs_on_gpu", lambda: True)
    assert auto_order() == ["tensorrt", "onnxruntime", "openvino", "torch"]
    assert open_runner(package, "auto").name == "onnxruntime"


def hide_openvino(monkeypatch) -> None:
    """As on a device without the openvino extra: `import openvino` fails."""
    monkeypatch.setitem(sys.modules, "openvino", None)
    monkeypatch.delitem(sys.modules, "musc_edge.runtime.openvino_runner", raising=False)


def test_missing_openvino_says_which_extra_to_install(tmp_path: Path, monkeypatch) -> None:
    hide_openvino(monkeypatch)
    package = write_package(tmp_path / "pkg")
    with pytest.raises(
        RunnerError, match="needs openvino: install musc-edge with the openvino extra"
    ):
        open_runner(package, "openvino")


def test_without_openvino_auto_takes_onnxruntime(package: ModelPackage, monkeypatch) -> None:
    hide_openvino(monkeypatch)
    assert open_runner(package, "auto").name == "onnxruntime"
    if not torch.cuda.is_available():  # fp16: no engine runs it on a CPU
        with pytest.raises(RunnerError, match="openvino: the openvino engine needs openvino"):
            open_runner(package, "auto", precision="fp16")
