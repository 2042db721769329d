"""LNAMD: local neighbourhood aggregation of patch tokens (docs/design.md, step 2).

Each patch is replaced by the mean of its r x r neighbourhood so that MSM compares regions of
several sizes; a defect smaller than one patch and one spread over several both stand out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def grid_side(num_patches: int) -> int:
    """Side h of the square patch grid with h * h == num_patches, or a ValueError."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(
            f"{num_patches} patch tokens do not form a square grid; drop class/register tokens "
            "and pass (N, h*h, C) tokens"
        )
    return side


def lnamd(tokens: torch.Tensor, r_list: Sequence[int]) -> list[torch.Tensor]:
    """Pool (N, L, C) tokens over each r x r neighbourhood; one (N, L, C) unit-vector set per r.

    LayerNorm spans the whole (C, h, h) map of one image (no affine), the mean counts the zero
    padding at the border, and every pooled patch vector is L2-normalised so that MSM can use
    inner products in place of distances.
    """
    n, num_patches, dim = tokens.shape
    side = grid_side(num_patches)
    grid = tokens.float().transpose(1, 2).reshape(n, dim, side, side)
    grid = F.layer_norm(grid, (dim, side, side))
    pooled_sets = []
    for r in r_list:
        pooled = grid if r == 1 else F.avg_pool2d(grid, r, stride=1, padding=r // 2)
        pooled_sets.append(F.normalize(pooled.flatten(2).transpose(1, 2), dim=-1))
    return pooled_sets
