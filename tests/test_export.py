"""Export end to end: the real dinov2-vits14 through the CLI, a random CLIP ViT-B-32 through
the API; the TensorRT build logic with TensorRT replaced by fakes (no GPU here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from musc_edge.cli import app
from musc_edge.export import exporter
from musc_edge.export.staging import check_replaceable
from musc_edge.features import extract_features, torch_extractor
from musc_edge.models import create_backbone
from musc_edge.musc import MuSc
from musc_edge.package import (
    ENGINE_FILE,
    MANIFEST,
    ONNX_FILE,
    PARITY_FILE,
    PARITY_REFERENCE_FILE,
    load_package,
)
from musc_edge.runtime import engine_builder
from musc_edge.runtime.engine_builder import (
    EngineBuildError,
    build_package_engine,
    configure_precision,
    engine_parity,
    engine_support,
    profile_shapes,
)
from musc_edge.runtime.runners import open_runner
from tests.conftest import BOTTLE
from tests.helpers import make_package

runner = CliRunner()
VITS14_OUTPUTS = ["tokens_6", "tokens_9", "embedding"]


@pytest.fixture(scope="module")
def vits14(tmp_path_factory: pytest.TempPathFactory, dinov2_vits14) -> tuple[Path, str]:
    """`musc-edge export` of the real dinov2-vits14 at 224, once for the module; parity on
    bottle images when the shared data is there, generated images otherwise."""
    folder = tmp_path_factory.mktemp("export") / "dinov2-vits14-224"
    args = ["export", "--backbone", "dinov2-vits14", "--image-size", "224", "--out", str(folder)]
    if BOTTLE.is_dir():
        args += ["--parity-images", str(BOTTLE / "test")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return folder, result.output


def test_export_writes_a_verified_package(vits14: tuple[Path, str]) -> None:
    folder, output = vits14
    package = load_package(folder, image_size=224)
    assert set(package.artifacts) == {ONNX_FILE, PARITY_REFERENCE_FILE}
    assert package.weights_source == "fetched:dinov2-vits14" and package.weights_sha256
    assert (package.token_dim, package.embedding_dim, package.grid) == (384, 384, (16, 16))
    assert torch.__version__.startswith(package.versions["torch"]) and package.onnx_opset >= 17
    assert "✓ exporting the ONNX graph" in output
    assert [p.name for p in folder.parent.iterdir()] == [folder.name], "staging left behind"


def test_onnx_graph_is_valid_dynamic_and_named(vits14: tuple[Path, str]) -> None:
    path = vits14[0] / ONNX_FILE
    onnx.checker.check_model(str(path))
    graph = onnx.load(str(path)).graph
    (images,) = graph.input
    assert images.name == "images"
    assert images.type.tensor_type.shape.dim[0].dim_param, "batch is not dynamic"
    assert [output.name for output in graph.output] == VITS14_OUTPUTS
    ops = [node.op_type for node in graph.node]
    # 2 per block, the final norm per token output and on the class token
    assert ops.count("LayerNormalization") == 2 * 12 + len(VITS14_OUTPUTS)
    assert ops.count("Softmax") == 12  # attention as MatMul-Softmax-MatMul, one per block


def test_onnxruntime_reproduces_torch_in_the_parity_report(vits14: tuple[Path, str]) -> None:
    folder, output = vits14
    parity = json.loads((folder / PARITY_FILE).read_text())
    assert parity["images"]["source"] == (str(BOTTLE / "test") if BOTTLE.is_dir() else "generated")
    onnxruntime = parity["onnxruntime"]
    assert onnxruntime["batches"] == [1, 3] and onnxruntime["passed"]
    assert list(onnxruntime["outputs"]) == VITS14_OUTPUTS
    assert all(error["max_rel"] <= 1e-4 for error in onnxruntime["outputs"].values())
    if engine_support() is not None:
        assert parity["tensorrt"] == {"skipped": engine_support()}
        assert "TensorRT engine skipped" in output


def test_musc_scores_from_onnxruntime_equal_torch(
    vits14: tuple[Path, str], bottle_features, dinov2_vits14
):
    package = load_package(vits14[0])
    onnx_features = extract_features(
        bottle_features.paths, package.preprocessing(), open_runner(package, "onnxruntime")
    )
    musc = MuSc()
    ours = musc.score(onnx_features.tokens, onnx_features.embeddings)
    chosen = [dinov2_vits14.layers.index(layer) for layer in package.layers]  # the preset's
    reference = musc.score([bottle_features.tokens[i] for i in chosen], bottle_features.embeddings)
    assert len(bottle_features.paths) >= 10
    for name in ("raw_scores", "scores", "patch_maps"):
        torch.testing.assert_close(
            getattr(ours, name), getattr(reference, name), rtol=0, atol=1e-4, msg=name
        )


def test_engine_parity_checks_both_ends_of_the_profile(vits14, monkeypatch):
    """engine_parity with the torch model standing in for the TensorRT runner."""
    package = load_package(vits14[0])
    model = create_backbone("dinov2-vits14", 224, package.layers)
    fake = SimpleNamespace(TensorRTRunner=lambda package: torch_extractor(model))
    monkeypatch.setitem(sys.modules, "musc_edge.runtime.tensorrt_runner", fake)
    package.engine = {"gpu": "torch on the CPU"}
    entry = engine_parity(package, package.path(PARITY_REFERENCE_FILE))
    assert entry["batches"] == [1, 8] and entry["passed"] and entry["max_rel"] < 1e-5


def test_export_refuses_to_overwrite_without_force(vits14: tuple[Path, str]) -> None:
    result = runner.invoke(app, ["export", "--out", str(vits14[0])])
    assert result.exit_code == 2
    assert "already exists; pass --force" in " ".join(result.output.split())


def test_engine_build_says_why_it_cannot_run_here(vits14: tuple[Path, str]) -> None:
    if engine_support() is None:
        pytest.skip("TensorRT and a GPU are present: this test is for machines without")
    result = runner.invoke(app, ["engine", "build", "--model", str(vits14[0])])
    assert result.exit_code == 2
    assert "cannot build an engine here" in " ".join(result.output.split())


def test_clip_export_through_the_api(tmp_path: Path) -> None:
    """A random ViT-B-32 (no CLIP weights are reachable here): the open_clip tower's graph,
    generated parity images, and the manifest fields that differ from DINOv2's."""
    stages: list[str] = []
    result = exporter.export_package(
        create_backbone("ViT-B-32", 224, random_init=True),
        tmp_path / "vit-b-32",
        musc_settings={"r_list": [1, 3], "frac": 0.3, "k_list": [1], "precision": "bf16"},
        precision="fp32",
        max_batch=2,
        parity_dir=None,
        force=False,
        on_stage=stages.append,
    )
    package = load_package(tmp_path / "vit-b-32")
    assert (package.token_dim, package.embedding_dim, package.grid) == (768, 512, (7, 7))
    assert package.weights_source == "random-init" and package.weights_sha256 is None
    assert (package.precision, package.max_batch) == ("fp32", 2)
    assert package.musc["k_list"] == [1] and package.preprocess["mean"][0] == 0.48145466
    assert result.parity["images"]["source"] == "generated"
    assert result.parity["onnxruntime"]["passed"]
    assert stages[0] == "running the torch model on the parity images"
    assert stages[-1] == "moving the package into place"


def test_interrupted_export_leaves_the_old_package(tmp_path, dinov2_vits14, monkeypatch):
    old = make_package(tmp_path / "pkg")
    manifest = (tmp_path / "pkg" / MANIFEST).read_text()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(exporter, "export_onnx", interrupted)
    with pytest.raises(KeyboardInterrupt):
        exporter.export_package(
            dinov2_vits14,
            old.folder,
            musc_settings={},
            precision="fp16",
            max_batch=8,
            parity_dir=None,
            force=True,
            on_stage=lambda stage: None,
        )
    assert (tmp_path / "pkg" / MANIFEST).read_text() == manifest
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]


def test_only_packages_are_replaced(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a model package"):
        check_replaceable(tmp_path / "notes", force=True)
    with pytest.raises(FileExistsError, match="pass --force"):
        check_replaceable(tmp_path / "notes", force=False)
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", force=True)
    check_replaceable(tmp_path / "absent", force=False)


def test_profile_covers_one_to_max_batch_tuned_for_full_batches() -> None:
    assert profile_shapes(518, 8) == ((1, 3, 518, 518), (8, 3, 518, 518), (8, 3, 518, 518))
    assert profile_shapes(224, 1) == ((1, 3, 224, 224),) * 3
    with pytest.raises(ValueError, match="at least 1"):
        profile_shapes(224, 0)


def test_missing_tensorrt_is_named(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    assert engine_support().startswith("TensorRT is not installed")


class FakeLayer:
    def __init__(self, kind: str) -> None:
        self.type, self.name, self.precision = kind, kind, None
        self.num_outputs = 1
        self.output_types: dict[int, str] = {}

    def set_output_type(self, index: int, dtype: str) -> None:
        self.output_types[index] = dtype


class FakeConfig:
    def __init__(self) -> None:
        self.flags: set[str] = set()
        self.cleared: set[str] = set()

    def set_flag(self, flag: str) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag: str) -> None:
        self.cleared.add(flag)


def fake_tensorrt(version: str) -> SimpleNamespace:
    """The few TensorRT names configure_precision uses; 11.x has no FP16 builder flag."""
    flags = ["TF32", "OBEY_PRECISION_CONSTRAINTS"] + (["FP16"] if version < "11" else [])
    kinds = ("NORMALIZATION", "REDUCE", "SOFTMAX", "MATRIX_MULTIPLY")
    return SimpleNamespace(
        __version__=version,
        BuilderFlag=SimpleNamespace(**{flag: flag for flag in flags}),
        LayerType=SimpleNamespace(**{kind: kind for kind in kinds}),
        float32="float32",
    )


def fake_network(*kinds: str) -> SimpleNamespace:
    layers = [FakeLayer(kind) for kind in kinds]
    return SimpleNamespace(num_layers=len(layers), get_layer=layers.__getitem__, layers=layers)


def test_fp16_pins_normalisations_and_reductions_to_fp32() -> None:
    network = fake_network("MATRIX_MULTIPLY", "NORMALIZATION", "SOFTMAX", "REDUCE")
    config = FakeConfig()
    assert configure_precision(fake_tensorrt("10.3.0"), network, config, "fp16") == 2
    assert config.flags == {"FP16", "OBEY_PRECISION_CONSTRAINTS"}
    pinned = {layer.type: (layer.precision, layer.output_types) for layer in network.layers}
    assert pinned["NORMALIZATION"] == pinned["REDUCE"] == ("float32", {0: "float32"})
    assert pinned["SOFTMAX"] == pinned["MATRIX_MULTIPLY"] == (None, {})


def test_fp32_means_fp32_and_fp16_needs_the_builder_flag() -> None:
    config = FakeConfig()
    assert configure_precision(fake_tensorrt("10.3.0"), fake_network(), config, "fp32") == 0
    assert config.cleared == {"TF32"} and not config.flags
    with pytest.raises(EngineBuildError, match="strongly typed"):
        configure_precision(fake_tensorrt("11.4.0"), fake_network(), FakeConfig(), "fp16")


def fake_build(onnx_path, engine_path, image_size, precision, max_batch, timing_cache) -> dict:
    engine_path.write_bytes(b"serialized engine")
    return {"gpu": "Test GPU", "compute_capability": "8.7", "tensorrt": "10.3.0"}


@pytest.mark.parametrize("max_rel", [2e-4, float("nan")], ids=["sound", "overflowing"])
def test_engine_is_installed_only_when_sound(tmp_path, monkeypatch, max_rel: float) -> None:
    package = make_package(tmp_path / "pkg")
    before = (tmp_path / "pkg" / MANIFEST).read_text()
    monkeypatch.setattr(engine_builder, "build_engine", fake_build)
    monkeypatch.setattr(engine_builder, "engine_parity", lambda *_: {"max_rel": max_rel})
    if np.isnan(max_rel):
        with pytest.raises(EngineBuildError, match="NaN or inf"):
            build_package_engine(package, "fp16", 4, lambda stage: None)
        assert (tmp_path / "pkg" / MANIFEST).read_text() == before
        assert not (tmp_path / "pkg" / ENGINE_FILE).exists()
    else:
        build_package_engine(package, "fp32", 4, lambda stage: None)
        built = load_package(tmp_path / "pkg")
        assert (built.precision, built.max_batch, built.engine["gpu"]) == ("fp32", 4, "Test GPU")
        assert ENGINE_FILE in built.artifacts
        assert json.loads((tmp_path / "pkg" / PARITY_FILE).read_text())["tensorrt"]
    assert not (tmp_path / "pkg" / ".engine-build").exists()
