"""DINOv2 towers from timm, as final-normed block tokens plus the normed class token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from musc_edge.models.backbone import Backbone, WeightsInfo
from musc_edge.models.registry import BackboneSpec


class Dinov2Tower(Backbone):
    """timm `VisionTransformer`; each chosen block's output gets the final LayerNorm, as
    DINOv2's own `get_intermediate_layers` does."""

    def __init__(
        self,
        spec: BackboneSpec,
        vit: nn.Module,
        image_size: int,
        layers: tuple[int, ...],
        weights: WeightsInfo,
    ) -> None:
        super().__init__(spec, image_size, layers, weights)
        self.vit = vit.eval()

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        final, tokens = self.vit.forward_intermediates(
            images, indices=[layer - 1 for layer in self.layers], norm=True, output_fmt="NLC"
        )
        return list(tokens), F.normalize(final[:, 0], dim=-1)
