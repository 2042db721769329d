"""`create_backbone`: one call from a backbone name and a weights choice to a ready tower."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from musc_edge.errors import UsageError
from musc_edge.files import file_sha256
from musc_edge.models import clip, dinov2  # noqa: F401  (each registers its family)
from musc_edge.models.backbone import Backbone, BuildRequest, WeightsInfo
from musc_edge.models.registry import FAMILIES, get_spec
from musc_edge.models.weights import fetched_weights_path, missing_weights
from musc_edge.size import ImageSize

RANDOM_INIT_SEED = 0


def create_backbone(
    name: str,
    image_size: ImageSize | int | str | None = None,
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
    size = ImageSize.parse(image_size or spec.native_size)
    chosen = tuple(layers) if layers else spec.default_layers
    build = FAMILIES[spec.family]
    with seeded(RANDOM_INIT_SEED) if random_init else contextlib.nullcontext():
        return build(BuildRequest(spec, size, chosen, info, pretrained, weights))


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Random weights that are the same on every machine, so that a random-init package's
    torch runner rebuilds exactly what was exported; the caller's RNG state is kept."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
