"""CLIP image towers from open_clip, as block tokens plus the projected image embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from musc_edge.errors import UsageError
from musc_edge.models.backbone import Backbone, WeightsInfo, resample_position_grid
from musc_edge.models.registry import BackboneSpec


class ClipTower(Backbone):
    """open_clip `VisionTransformer` run block by block, keeping the residual stream."""

    def __init__(
        self,
        spec: BackboneSpec,
        visual: nn.Module,
        image_size: int,
        layers: tuple[int, ...],
        weights: WeightsInfo,
    ) -> None:
        super().__init__(spec, image_size, layers, weights)
        if visual.attn_pool is not None or visual.pool_type != "tok":
            raise UsageError(f"{spec.name}: only class-token pooled CLIP towers are supported")
        pos = resample_position_grid(visual.positional_embedding.data, 1, self.grid)
        visual.positional_embedding = nn.Parameter(pos)
        self.visual = visual.eval()

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        v = self.visual
        x = v.conv1(images).flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = v.ln_pre(torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype))
        batch_first = getattr(v.transformer, "batch_first", True)
        tokens = []
        for index, block in enumerate(v.transformer.resblocks, start=1):
            x = block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)
            if index in self.layers:
                tokens.append(x[:, 1:])
        embedding = v.ln_post(x[:, 0])
        if v.proj is not None:
            embedding = embedding @ v.proj
        return tokens, F.normalize(embedding, dim=-1)
