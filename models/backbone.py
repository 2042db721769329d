"""The one interface every backbone offers: images in, block tokens and an image embedding out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from musc_edge.errors import UsageError
from musc_edge.images import Preprocess
from musc_edge.models.registry import BackboneSpec


@dataclass(frozen=True)
class WeightsInfo:
    """Where a backbone's weights came from, recorded in every result and model package."""

    source: str  # "pretrained:openai", "file:/path", "fetched:dinov2-vits14", "random-init"
    sha256: str | None = None


@dataclass(frozen=True)
class BuildRequest:
    """What a family builder gets: which tower, at what size, which blocks, which weights."""

    spec: BackboneSpec
    image_size: int
    layers: tuple[int, ...]
    info: WeightsInfo
    pretrained: str | None = None  # a hub tag
    weights_file: Path | None = None  # a local state dict


class Backbone(nn.Module):
    """ViT image tower returning (tokens, embedding).

    tokens: one (N, L, C) tensor per chosen block (1-based indices), class and register
    tokens dropped, L = (image_size / patch_size) ** 2; embedding: (N, D), L2-normalised.
    """

    def __init__(self, request: BuildRequest) -> None:
        super().__init__()
        spec, image_size, layers = request.spec, request.image_size, request.layers
        if image_size % spec.patch_size:
            raise UsageError(
                f"image size {image_size} is not a multiple of {spec.name}'s patch size "
                f"{spec.patch_size}; try {image_size // spec.patch_size * spec.patch_size}"
            )
        if not layers or any(not 1 <= layer <= spec.depth for layer in layers):
            raise UsageError(
                f"layers {layers} out of range: {spec.name} has blocks 1..{spec.depth}"
            )
        self.spec = spec
        self.image_size = image_size
        self.layers = tuple(layers)
        self.weights = request.info

    @property
    def grid(self) -> int:
        return self.image_size // self.spec.patch_size

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(self.image_size, self.spec.mean, self.spec.std, self.spec.resize)

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        raise NotImplementedError


def resample_position_grid(pos: torch.Tensor, num_prefix: int, new_side: int) -> torch.Tensor:
    """Resize (..., prefix + side**2, C) position embeddings to a new square grid (bicubic).

    Done once when a model is built, so that the exported graph holds plain constants.
    """
    prefix, grid = pos[..., :num_prefix, :], pos[..., num_prefix:, :]
    side = int(grid.shape[-2] ** 0.5)
    if side == new_side:
        return pos
    lead = grid.shape[:-2]
    dim = grid.shape[-1]
    image = grid.reshape(-1, side, side, dim).permute(0, 3, 1, 2).float()
    image = F.interpolate(image, size=(new_side, new_side), mode="bicubic", align_corners=False)
    grid = image.permute(0, 2, 3, 1).reshape(*lead, new_side * new_side, dim).to(pos.dtype)
    return torch.cat([prefix, grid], dim=-2)
