"""`create_backbone`: one call from a backbone name and a weights choice to a ready tower."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from musc_edge.errors import UsageError
from musc_edge.files import file_sha256
from musc_edge.models.backbone import Backbone, WeightsInfo, resample_position_grid
from musc_edge.models.clip import ClipTower
from musc_edge.models.dinov2 import Dinov2Tower
from musc_edge.models.registry import BackboneSpec, get_spec
from musc_edge.models.weights import (
    MissingWeightsError,
    fetched_weights_path,
    load_state_file,
    missing_weights,
)

RANDOM_INIT_SEED = 0


def create_backbone(
    name: str,
    image_size: int | None = None,
    layers: Sequence[int] | None = None,
    *,
    pretrained: str | None = None,
    weights: Path | None = None,
    random_init: bool = False,
) -> Backbone:
    """Build a backbone in eval mode.

    Weights, in order: `weights` (a local file), `pretrained` (a hub tag), `random_init`
    (tests only, seeded so it is the same everywhere); with none of them, the cache filled by
    `musc-edge weights fetch`. No hub is contacted unless `pretrained` is given.
    """
    spec = get_spec(name)
    if sum((weights is not None, pretrained is not None, random_init)) > 1:
        raise UsageError("give at most one of weights, pretrained and random_init")
    if weights is None and pretrained is None and not random_init:
        weights = fetched_weights_path(spec.name)
        if weights is None or not weights.is_file():
            raise missing_weights(spec, "none given and none fetched")
        source = f"fetched:{spec.name}"
    else:
        source = f"file:{weights}" if weights else f"pretrained:{pretrained}"
    if random_init:
        source = "random-init"
    info = WeightsInfo(source, file_sha256(weights) if weights else None)
    size = image_size or spec.native_size
    chosen = tuple(layers) if layers else spec.default_layers
    with seeded(RANDOM_INIT_SEED) if random_init else contextlib.nullcontext():
        if spec.family == "clip":
            return ClipTower(spec, _clip_visual(spec, pretrained, weights), size, chosen, info)
        return Dinov2Tower(spec, _dinov2_vit(spec, size, pretrained, weights), size, chosen, info)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Random weights that are the same on every machine, so that a random-init package's
    torch reference rebuilds exactly what was exported; the caller's RNG state is kept."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _clip_visual(spec: BackboneSpec, pretrained: str | None, weights: Path | None) -> nn.Module:
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
        _load_strict(visual, state, spec, weights)
    return visual


def _dinov2_vit(
    spec: BackboneSpec, image_size: int, pretrained: str | None, weights: Path | None
) -> nn.Module:
    """The timm DINOv2 ViT at `image_size`, its position grid resampled once here."""
    import timm

    if pretrained is not None:
        try:
            return timm.create_model(
                f"{spec.arch}.{pretrained}", pretrained=True, img_size=image_size
            )
        except Exception as error:
            reason = f"--pretrained {pretrained} failed: {type(error).__name__}"
            raise missing_weights(spec, reason) from error
    vit = timm.create_model(spec.arch, pretrained=False, img_size=image_size)
    if weights is not None:
        state = dict(load_state_file(weights))
        if "pos_embed" in state:
            grid = image_size // spec.patch_size
            state["pos_embed"] = resample_position_grid(state["pos_embed"], 1, grid)
        _load_strict(vit, state, spec, weights)
    return vit


def _load_strict(module: nn.Module, state: dict, spec: BackboneSpec, path: Path) -> None:
    """Load every tensor or explain in one line why the file does not fit."""
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise MissingWeightsError(
            f"{path} does not fit {spec.name}: {len(result.missing_keys)} missing keys "
            f"(e.g. {result.missing_keys[:2]}), {len(result.unexpected_keys)} unexpected "
            f"(e.g. {result.unexpected_keys[:2]})"
        )
