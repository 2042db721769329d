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
from musc_edge.size import ImageSize


@dataclass(frozen=True)
class WeightsInfo:
    """Where a backbone's weights came from, recorded in every result and model package."""

    source: str  # "pretrained:openai", "file:/path", "fetched:dinov2-vits14", "random-init"
    sha256: str | None = None


@dataclass(frozen=True)
class BuildRequest:
    """What a family builder gets: which tower, at what size, which blocks, which weights."""

    spec: BackboneSpec
    image_size: ImageSize
    layers: tuple[int, ...]
    info: WeightsInfo
    pretrained: str | None = None  # a hub tag
    weights_file: Path | None = None  # a local state dict


class Backbone(nn.Module):
    """ViT image tower returning (tokens, embedding).

    tokens: one (N, L, C) tensor per chosen block (1-based indices), class and register
    tokens dropped, L = rows * columns of the patch grid, row by row; embedding: (N, D),
    L2-normalised.
    """

    def __init__(self, request: BuildRequest) -> None:
        super().__init__()
        spec, image_size, layers = request.spec, request.image_size, request.layers
        image_size.check_multiple(spec.patch_size, spec.name)
        if not layers or any(not 1 <= layer <= spec.depth for layer in layers):
            raise UsageError(
                f"layers {layers} out of range: {spec.name} has blocks 1..{spec.depth}"
            )
        self.spec = spec
        self.image_size = image_size
        self.layers = tuple(layers)
        self.weights = request.info

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of the patch grid."""
        return self.image_size.grid(self.spec.patch_size)

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(self.image_size, self.spec.mean, self.spec.std, self.spec.resize)

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        raise NotImplementedError


def resample_position_grid(
    pos: torch.Tensor, num_prefix: int, new_grid: tuple[int, int]
) -> torch.Tensor:
    """Resize (..., prefix + side**2, C) position embeddings to a (rows, columns) grid
    (bicubic).

    Done once when a model is built, so that the exported graph holds plain constants.
    """
    prefix, grid = pos[..., :num_prefix, :], pos[..., num_prefix:, :]
    side = int(grid.shape[-2] ** 0.5)
    if (side, side) == tuple(new_grid):
        return pos
    lead = grid.shape[:-2]
    dim = grid.shape[-1]
    image = grid.reshape(-1, side, side, dim).permute(0, 3, 1, 2).float()
    image = F.interpolate(image, size=tuple(new_grid), mode="bicubic", align_corners=False)
    grid = image.permute(0, 2, 3, 1).reshape(*lead, new_grid[0] * new_grid[1], dim).to(pos.dtype)
    return torch.cat([prefix, grid], dim=-2)
