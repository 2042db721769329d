"""Backbones: shapes, position resizing, weights from files, and the missing-weights message."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from musc_edge.files import file_sha256
from musc_edge.models import MissingWeightsError, create_backbone


@pytest.mark.parametrize(
    ("name", "size", "grid", "dim", "embed"),
    [
        ("ViT-B-32", 224, 7, 768, 512),
        ("ViT-B-16", 160, 10, 768, 512),
        ("dinov2-vits14", 98, 7, 384, 384),
    ],
)
def test_random_init_shapes_and_unit_embeddings(name, size, grid, dim, embed) -> None:
    backbone = create_backbone(name, size, random_init=True)
    with torch.no_grad():
        tokens, embedding = backbone(torch.randn(2, 3, size, size))
    assert len(tokens) == 4
    assert all(t.shape == (2, grid * grid, dim) for t in tokens)
    assert embedding.shape == (2, embed)
    torch.testing.assert_close(embedding.norm(dim=-1), torch.ones(2))
    assert backbone.weights.source == "random-init"


def test_clip_position_grid_resized_once_at_build() -> None:
    backbone = create_backbone("ViT-B-16", 160, random_init=True)
    assert backbone.visual.positional_embedding.shape == (1 + 10 * 10, 768)


def test_clip_weights_file_round_trip(tmp_path) -> None:
    """A saved full-CLIP state dict ('visual.' keys) loads strictly and gives the same output."""
    torch.manual_seed(0)
    source = create_backbone("ViT-B-32", 224, random_init=True)
    path = tmp_path / "clip.safetensors"
    save_file({f"visual.{k}": v.contiguous() for k, v in source.visual.state_dict().items()}, path)
    loaded = create_backbone("ViT-B-32", 224, weights=path)
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images)[1], source(images)[1])
    assert loaded.weights.source == f"file:{path}"
    assert loaded.weights.sha256 == file_sha256(path)


def test_torch_weights_file_is_loaded_weights_only(tmp_path) -> None:
    source = create_backbone("dinov2-vits14", 56, random_init=True)
    path = tmp_path / "dino.pt"
    torch.save({"state_dict": source.vit.state_dict()}, path)
    loaded = create_backbone("dinov2-vits14", 56, weights=path)
    images = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images)[0][0], source(images)[0][0])


def test_weights_that_do_not_fit_are_refused(tmp_path) -> None:
    path = tmp_path / "wrong.safetensors"
    save_file({"something.weight": torch.zeros(3)}, path)
    with pytest.raises(MissingWeightsError, match="does not fit dinov2-vits14"):
        create_backbone("dinov2-vits14", 56, weights=path)


def test_missing_weights_names_every_way_to_supply_them(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("MUSC_EDGE_CACHE", str(tmp_path))
    with pytest.raises(MissingWeightsError) as error:
        create_backbone("dinov2-vits14", 224)
    message = str(error.value)
    for way in ("musc-edge weights fetch dinov2-vits14", "--weights FILE", "--pretrained"):
        assert way in message
    with pytest.raises(MissingWeightsError, match="--weights FILE"):
        create_backbone("ViT-L-14-336", 336)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 225}, "multiple of"),
        ({"layers": (0, 13)}, "out of range"),
        ({"random_init": True, "pretrained": "openai"}, "at most one"),
    ],
)
def test_bad_backbone_arguments(kwargs, message) -> None:
    kwargs.setdefault("random_init", True)
    with pytest.raises(ValueError, match=message):
        create_backbone("ViT-B-32", **kwargs)


def test_unknown_backbone_lists_known_names() -> None:
    with pytest.raises(ValueError, match="ViT-L-14-336"):
        create_backbone("resnet50", random_init=True)


def test_fetched_dinov2_is_real_and_recorded(dinov2_vits14) -> None:
    assert dinov2_vits14.weights.source == "fetched:dinov2-vits14"
    assert dinov2_vits14.layers == (3, 6, 9, 12)
    assert dinov2_vits14.weights.sha256 is not None
