"""What a line device installs and loads: the runtime without the measurement beside it.

Benchmarks, streams and evaluation live in `musc_edge.bench` (bench/), which may import the
runtime; the runtime, the core and `musc-edge run` never import it, nor scikit-learn or
scikit-image (which only its metrics need), nor the model zoo (as in test_runtime_line.py,
which checks the same on a real package). The device extras install none of them either.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement

from musc_edge.package import EMBEDDING_NAME, ONNX_FILE
from tests.helpers import results, write_package, write_parts

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
DEVICE_EXTRAS = ("runtime", "openvino", "gpu")
MEASUREMENT_ONLY = ("scikit-learn", "scikit-image")
# never loaded on a line device: the measurement package, what its metrics need, the model zoo
# and the export side with what they need
NOT_ON_A_DEVICE = (
    "musc_edge.bench",
    "sklearn",
    "skimage",
    "musc_edge.models",
    "musc_edge.export",
    "open_clip",
    "timm",
    "onnx",
)

# Imports every module of the core, the CLI and the runtime that imports here (a runner or sink
# whose own library is missing is one a device without that extra never loads either; models/
# and export/ are other folders, so not walked), then runs
# `musc-edge run --once` on ONNX Runtime with the built-in sinks, as a device does, and prints
# what it loaded of NOT_ON_A_DEVICE.
DEVICE = """
import importlib, pkgutil, sys

import musc_edge
import musc_edge.runtime

skipped = []
for package in (musc_edge, musc_edge.runtime):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        try:
            importlib.import_module(module.name)
        except ModuleNotFoundError as missing:
            if missing.name.startswith("musc_edge"):
                raise
            skipped.append(module.name)

from musc_edge.cli import app

camera, package, out, heavy = sys.argv[1:]
args = ["run", "--camera-dir", camera, "--model", package, "--out", out, "--once"]
try:
    app([*args, "--settle", "0", "--engine", "onnxruntime"])
except SystemExit as done:
    assert not done.code, done.code
print("skipped:", skipped)
print(
    "loaded:",
    sorted(m for m in sys.modules for h in heavy.split(",") if m == h or m.startswith(h + ".")),
)
"""


def stand_in_package(folder: Path) -> None:
    """A model package whose backbone.onnx is a few operators: patch colour means through a
    fixed projection, two token outputs and their mean as the embedding (no model zoo)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    package = write_package(
        folder, image_size=56, layers=[1, 2], token_dim=32, embedding_dim=32, onnx_opset=17
    )
    first, second = package.token_outputs
    projection = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    nodes = [
        helper.make_node(
            "AveragePool", ["images"], ["pooled"], kernel_shape=[14, 14], strides=[14, 14]
        ),
        helper.make_node("Reshape", ["pooled", "shape"], ["flat"]),
        helper.make_node("Transpose", ["flat"], ["patches"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["patches", "projection"], ["projected"]),
        helper.make_node("Sin", ["projected"], [first]),
        helper.make_node("Mul", [first, "two"], [second]),
        helper.make_node("ReduceMean", [first], [EMBEDDING_NAME], axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "stand-in",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 56, 56])],
        [
            helper.make_tensor_value_info(first, TensorProto.FLOAT, ["batch", 16, 32]),
            helper.make_tensor_value_info(second, TensorProto.FLOAT, ["batch", 16, 32]),
            helper.make_tensor_value_info(EMBEDDING_NAME, TensorProto.FLOAT, ["batch", 32]),
        ],
        [
            numpy_helper.from_array(np.array([0, 3, -1], np.int64), "shape"),
            numpy_helper.from_array(projection, "projection"),
            numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, package.path(ONNX_FILE))
    package.record_artifact(ONNX_FILE)
    package.write()


def test_a_line_device_loads_no_benchmark_evaluation_or_their_libraries(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    stand_in_package(tmp_path / "pkg")
    write_parts(tmp_path / "camera", 6)
    paths = [str(tmp_path / name) for name in ("camera", "pkg", "out")]
    command = [sys.executable, "-c", DEVICE, *paths, ",".join(NOT_ON_A_DEVICE)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr + done.stdout
    print(done.stdout)  # which runtime modules were skipped for a missing extra, with -s
    assert len(results(tmp_path / "out")) == 6
    assert "loaded: []" in done.stdout


def requirement_names(extras: tuple[str, ...]) -> dict[str, set[str]]:
    """What the core dependencies plus each of `extras` install, by distribution name,
    following `musc-edge[...]` references to other extras recursively."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    own = canonical(project["name"])
    optional = project["optional-dependencies"]

    def resolve(requirements: list[str], seen: set[str]) -> set[str]:
        names: set[str] = set()
        for text in requirements:
            requirement = Requirement(text)
            name = canonical(requirement.name)
            if name != own:
                names.add(name)
                continue
            for extra in sorted(requirement.extras - seen):
                seen.add(extra)
                names |= resolve(optional[extra], seen)
        return names

    return {
        extra: resolve(project["dependencies"], set()) | resolve(optional[extra], {extra})
        for extra in extras
    }


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_device_extras_install_neither_scikit_learn_nor_scikit_image() -> None:
    installed = requirement_names((*DEVICE_EXTRAS, "eval", "dev"))
    for extra in DEVICE_EXTRAS:
        assert not installed[extra] & set(MEASUREMENT_ONLY), f"extra {extra!r} pulls them in"
    # not vacuous: the extras that measure name both, `dev` through `musc-edge[eval,...]`
    assert set(MEASUREMENT_ONLY) <= installed["eval"]
    assert set(MEASUREMENT_ONLY) <= installed["dev"]


def test_every_folder_the_package_build_maps_is_copied_into_the_device_images() -> None:
    """pip refuses to build without a mapped folder, bench/ included, though a device never
    loads it."""
    folders = set(
        tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["package-dir"].values()
    )
    assert "bench" in folders
    for dockerfile in sorted((ROOT / "configs" / "deploy").glob("Dockerfile.*")):
        copied = {
            path
            for source in re.findall(r"^COPY (.+) \S+$", dockerfile.read_text(), re.M)
            for path in source.split()
        }
        assert folders <= copied, f"{dockerfile.name} does not copy {sorted(folders - copied)}"
