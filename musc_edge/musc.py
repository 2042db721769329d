"""The MuSc scorer: LNAMD -> MSM -> maps -> RsCIN over one batch of unlabeled images."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from musc_edge import lnamd as reference_lnamd
from musc_edge import msm as reference_msm
from musc_edge import ops
from musc_edge.lnamd import grid_side
from musc_edge.precision import Precision, parse_precision
from musc_edge.rscin import rscin

RELIABLE_BATCH = 5
Progress = Callable[[int, int], None]
# (LNAMD, MSM) per backend: the custom ops, or the plain torch reference they are tested against
BACKENDS = {
    "ops": (ops.lnamd, ops.msm_scores),
    "reference": (reference_lnamd.lnamd, reference_msm.msm_scores),
}


class MuScInputError(ValueError):
    """Tokens or embeddings that MuSc cannot score; the message says what to fix."""


@dataclass
class MuScResult:
    """Scores of one batch: per-patch maps, raw image scores and RsCIN-smoothed scores."""

    patch_maps: torch.Tensor  # (N, h, h)
    raw_scores: torch.Tensor  # (N,) max of each patch map
    scores: torch.Tensor  # (N,) after RsCIN

    def pixel_maps(self, size: int | tuple[int, int]) -> torch.Tensor:
        """(N, H, W) maps upsampled bilinearly (align_corners=True) to the evaluation size."""
        maps = F.interpolate(
            self.patch_maps.unsqueeze(1), size=size, mode="bilinear", align_corners=True
        )
        return maps.squeeze(1)


def check_inputs(tokens: Sequence[torch.Tensor], embeddings: torch.Tensor) -> int:
    """Raise MuScInputError on anything MuSc cannot score; return the batch size."""
    if len(tokens) == 0:
        raise MuScInputError("tokens is empty: pass a list with one (N, L, C) tensor per layer")
    sizes = set()
    for index, layer in enumerate(tokens):
        if layer.ndim != 3 or not layer.is_floating_point():
            raise MuScInputError(
                f"tokens[{index}] has shape {tuple(layer.shape)} and dtype {layer.dtype}; "
                "expected a float tensor (N, L, C)"
            )
        try:
            grid_side(layer.shape[1])
        except ValueError as error:
            raise MuScInputError(f"tokens[{index}]: {error}") from None
        if not torch.isfinite(layer).all():
            raise MuScInputError(f"tokens[{index}] holds NaN or inf; check the backbone output")
        sizes.add((layer.shape[0], layer.shape[1]))
    if len(sizes) != 1:
        raise MuScInputError(
            f"layers disagree on (N, L): {sorted(sizes)}; every layer must hold the same images "
            "on the same patch grid"
        )
    ((num_images, _),) = sizes
    if num_images == 0:
        raise MuScInputError("the batch holds no images")
    if embeddings.ndim != 2 or embeddings.shape[0] != num_images:
        raise MuScInputError(
            f"embeddings has shape {tuple(embeddings.shape)}; expected ({num_images}, D) "
            "to match the tokens"
        )
    if not torch.isfinite(embeddings).all():
        raise MuScInputError("embeddings hold NaN or inf; check the backbone output")
    return num_images


class MuSc:
    """Zero-shot anomaly scoring of a batch of unlabeled images by mutual patch scoring.

    >>> result = MuSc().score(tokens, embeddings)  # tokens: list of (N, L, C), one per layer
    >>> result.scores, result.patch_maps
    """

    def __init__(
        self,
        r_list: Sequence[int] = (1, 3, 5),
        frac: float = 0.3,
        k_list: Sequence[int] = (1, 2, 3),
        precision: Precision | str = "fp32",
        memory_budget_mb: int = 256,
        backend: str = "ops",
    ) -> None:
        if not r_list or any(r < 1 or r % 2 == 0 for r in r_list):
            raise ValueError(f"r_list must hold odd sizes >= 1, got {tuple(r_list)}")
        if not 0 < frac <= 1:
            raise ValueError(f"frac must be in (0, 1], got {frac}")
        if not k_list or any(k < 1 for k in k_list):
            raise ValueError(f"k_list must hold sizes >= 1, got {tuple(k_list)}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.r_list = tuple(r_list)
        self.frac = frac
        self.k_list = tuple(k_list)
        self.precision = parse_precision(precision)
        self.budget_bytes = memory_budget_mb * 2**20
        self.backend = backend

    def pool(self, layer: torch.Tensor) -> list[torch.Tensor]:
        """LNAMD of one layer's (N, L, C) tokens: one unit-vector set per r."""
        return BACKENDS[self.backend][0](layer, self.r_list)

    def mutual_scores(self, z: torch.Tensor) -> torch.Tensor:
        """MSM of one (N, L, C) unit-vector set: (N, L) patch scores."""
        return BACKENDS[self.backend][1](z, self.frac, self.budget_bytes, self.precision.dtype)

    def patch_scores(
        self, tokens: Sequence[torch.Tensor], progress: Progress | None = None
    ) -> torch.Tensor:
        """(N, L) patch scores averaged over every layer and neighbourhood size."""
        total = None
        num_sets = len(tokens) * len(self.r_list)
        for index, z in enumerate(z for layer in tokens for z in self.pool(layer)):
            scores = self.mutual_scores(z)
            total = scores if total is None else total + scores
            if progress:
                progress(index + 1, num_sets)
        return total / num_sets

    @torch.no_grad()
    def score(
        self,
        tokens: Sequence[torch.Tensor],
        embeddings: torch.Tensor,
        progress: Progress | None = None,
    ) -> MuScResult:
        """Score N images against each other; see DESIGN.md section 3 for every step.

        `progress(done, total)` is called after each (layer, r) set, the slow part.
        """
        num_images = check_inputs(tokens, embeddings)
        if num_images < RELIABLE_BATCH:
            warnings.warn(
                f"MuSc scores {num_images} image(s) against each other; with fewer than "
                f"{RELIABLE_BATCH} the scores are defined but unreliable"
                + (" (a single image always scores 0)" if num_images == 1 else ""),
                stacklevel=2,
            )
        patch = self.patch_scores(tokens, progress)
        side = math.isqrt(patch.shape[1])
        patch_maps = patch.view(num_images, side, side)
        raw = patch.amax(dim=1)
        return MuScResult(patch_maps, raw, rscin(raw, embeddings.to(raw.device), self.k_list))
