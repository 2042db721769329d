"""Backbone precision: which runner runs what, bf16 features on real bottle images, and the
refusals that keep a line from silently running slower or differently than asked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from musc_edge.cli.bench_cmd import loosest
from musc_edge.features import torch_extractor
from musc_edge.images import read_image
from musc_edge.musc import MuSc
from musc_edge.precision import Precision, cpu_has_bf16
from musc_edge.runtime import torch_runner
from musc_edge.runtime.runners import RunnerError, open_runner
from tests.helpers import relative_error, write_package

needs_bf16 = pytest.mark.skipif(
    not cpu_has_bf16(), reason="this CPU has no native bf16 (AVX512-BF16, AMX or Arm BF16)"
)


def bottle_batch(bottle_dir: Path, preprocess, count: int = 6) -> np.ndarray:
    good = sorted((bottle_dir / "test" / "good").glob("*.png"))[: count // 2]
    bad = sorted((bottle_dir / "test" / "contamination").glob("*.png"))[: count - len(good)]
    return np.stack([preprocess(read_image(path)) for path in good + bad])


@needs_bf16
def test_bf16_backbone_stays_close_to_fp32_on_real_images(bottle_dir: Path, dinov2_vits14) -> None:
    batch = bottle_batch(bottle_dir, dinov2_vits14.preprocess)
    exact_tokens, exact_embedding = torch_extractor(dinov2_vits14)(batch)
    tokens, embedding = torch_extractor(dinov2_vits14, dtype=torch.bfloat16)(batch)
    assert all(layer.dtype == torch.float32 for layer in tokens)  # the rest is unchanged
    errors = [relative_error(a, b) for a, b in zip(tokens, exact_tokens, strict=True)]
    assert max(errors) < 0.03 and min(errors) > 0  # really computed in bf16, and close
    assert relative_error(embedding, exact_embedding) < 0.03
    exact = MuSc().score(exact_tokens, exact_embedding).scores
    ours = MuSc(precision="bf16").score(tokens, embedding).scores
    assert torch.equal(ours.argsort(), exact.argsort()) or float((ours - exact).abs().max()) < 0.02


def test_runner_precisions_are_checked_before_loading(tmp_path: Path) -> None:
    package = write_package(tmp_path / "pkg", weights_source="random-init", layers=[1, 2])
    with pytest.raises(RunnerError, match="onnxruntime engine runs the backbone in fp32 only"):
        open_runner(package, "onnxruntime", precision="bf16")
    with pytest.raises(ValueError, match="unknown precision 'int8'"):
        open_runner(package, "torch", precision="int8")
    if not torch.cuda.is_available():
        with pytest.raises(RunnerError, match="fp16 backbones run on CUDA only"):
            open_runner(package, "torch", allow_random_init=True, precision="fp16")
    runner = open_runner(package, "torch", allow_random_init=True)
    assert runner.precision is Precision.fp32 and "fp32" in runner.description


def test_bf16_is_refused_on_a_cpu_without_it(tmp_path: Path, monkeypatch) -> None:
    package = write_package(tmp_path / "pkg", weights_source="random-init", layers=[1, 2])
    monkeypatch.setattr(torch_runner, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RunnerError, match=r"no native bf16.*--backbone-precision fp32"):
        open_runner(package, "torch", allow_random_init=True, precision="bf16")


def test_auto_passes_over_engines_that_cannot_run_the_precision(tmp_path: Path) -> None:
    package = write_package(tmp_path / "pkg", weights_source="random-init", layers=[1, 2])
    (tmp_path / "pkg" / "backbone.onnx").write_bytes(b"not read: refused before loading")
    if cpu_has_bf16():
        runner = open_runner(package, "auto", allow_random_init=True, precision="bf16")
        assert runner.precision is Precision.bf16
        assert runner.name != "onnxruntime"
    with pytest.raises(RunnerError) as error:
        open_runner(package, "auto", precision="bf16")  # random weights not allowed
    assert "onnxruntime engine runs the backbone in fp32 only" in str(error.value)


def test_agreement_tolerance_follows_the_looser_precision() -> None:
    assert loosest(Precision.fp32, Precision.fp32) == "fp32"
    assert loosest(Precision.fp32, Precision.bf16) == "bf16"
    assert loosest(Precision.bf16, Precision.fp32) == "bf16"
