"""CLIP image towers from open_clip, as block tokens plus the projected image embedding."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from musc_edge.errors import UsageError
from musc_edge.models.backbone import Backbone, BuildRequest, resample_position_grid
from musc_edge.models.registry import BackboneSpec, register_family
from musc_edge.models.weights import load_state_file, load_strict, missing_weights


class ClipTower(Backbone):
    """open_clip `VisionTransformer` run block by block, keeping the residual stream."""

    def __init__(self, request: BuildRequest, visual: nn.Module) -> None:
        super().__init__(request)
        if visual.attn_pool is not None or visual.pool_type != "tok":
            raise UsageError(
                f"{request.spec.name}: only class-token pooled CLIP towers are supported"
            )
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


@register_family("clip")
def build_clip(request: BuildRequest) -> ClipTower:
    visual = clip_visual(request.spec, request.pretrained, request.weights_file)
    return ClipTower(request, visual)


def clip_visual(spec: BackboneSpec, pretrained: str | None, weights: Path | None) -> nn.Module:
    """The open_clip image tower with hub, file or random weights."""
    import open_clip

    if pretrained is not None:
        try:
            return open_clip.create_model(spec.arch, pretrained=pretrained).visual
        except Exception as error:  # hub errors come in many types; all mean "no weights"
            reason = f"--pretrained {pretrained} failed: {type(error).__name__}"
            raise missing_weights(spec, reason) from error
    logging.disable(logging.WARNING)  # open_clip warns "initialized randomly" before we load
    try:
        visual = open_clip.create_model(spec.arch, pretrained=None).visual
    finally:
        logging.disable(logging.NOTSET)
    if weights is not None:
        state = load_state_file(weights)
        if any(key.startswith("visual.") for key in state):
            state = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
        load_strict(visual, state, spec, weights)
    return visual
