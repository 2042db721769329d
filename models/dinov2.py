"""DINOv2 towers from timm, as final-normed block tokens plus the normed class token."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from musc_edge.models.backbone import Backbone, BuildRequest, resample_position_grid
from musc_edge.models.registry import BackboneSpec, register_family
from musc_edge.models.weights import load_state_file, load_strict, missing_weights
from musc_edge.size import ImageSize


class Dinov2Tower(Backbone):
    """timm `VisionTransformer`; each chosen block's output gets the final LayerNorm, as
    DINOv2's own `get_intermediate_layers` does."""

    def __init__(self, request: BuildRequest, vit: nn.Module) -> None:
        super().__init__(request)
        self.vit = vit.eval()

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        final, tokens = self.vit.forward_intermediates(
            images, indices=[layer - 1 for layer in self.layers], norm=True, output_fmt="NLC"
        )
        return list(tokens), F.normalize(final[:, 0], dim=-1)


@register_family("dinov2")
def build_dinov2(request: BuildRequest) -> Dinov2Tower:
    vit = dinov2_vit(request.spec, request.image_size, request.pretrained, request.weights_file)
    return Dinov2Tower(request, vit)


def dinov2_vit(
    spec: BackboneSpec, image_size: ImageSize, pretrained: str | None, weights: Path | None
) -> nn.Module:
    """The timm DINOv2 ViT at `image_size`, its position grid resampled once here."""
    import timm

    if pretrained is not None:
        try:
            return timm.create_model(
                f"{spec.arch}.{pretrained}", pretrained=True, img_size=image_size.hw
            )
        except Exception as error:
            reason = f"--pretrained {pretrained} failed: {type(error).__name__}"
            raise missing_weights(spec, reason) from error
    vit = timm.create_model(spec.arch, pretrained=False, img_size=image_size.hw)
    if weights is not None:
        state = dict(load_state_file(weights))
        if "pos_embed" in state:
            grid = image_size.grid(spec.patch_size)
            state["pos_embed"] = resample_position_grid(state["pos_embed"], 1, grid)
        load_strict(vit, state, spec, weights)
    return vit
