"""LNAMD: local neighbourhood aggregation of patch tokens (docs/design.md, step 2).

Each patch is replaced by the mean of its r x r neighbourhood so that MSM compares regions of
several sizes; a defect smaller than one patch and one spread over several both stand out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

Grid = tuple[int, int]  # (rows, columns) of patches; tokens run row by row


def grid_shape(num_patches: int, grid: Grid | None = None) -> Grid:
    """The (rows, columns) grid of `num_patches` tokens: `grid` when given (it must hold
    them), else the square one; a ValueError otherwise."""
    if grid is not None:
        rows, columns = grid
        if rows * columns != num_patches:
            raise ValueError(
                f"{num_patches} patch tokens do not fill a {rows} x {columns} patch grid; "
                "the tokens come from another input size"
            )
        return rows, columns
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(
            f"{num_patches} patch tokens do not form a square grid; drop class/register tokens "
            "and pass (N, h*h, C) tokens, or give the (rows, columns) grid of a non-square input"
        )
    return side, side


def lnamd(
    tokens: torch.Tensor, r_list: Sequence[int], grid: Grid | None = None
) -> list[torch.Tensor]:
    """Pool (N, L, C) tokens over each r x r neighbourhood; one (N, L, C) unit-vector set per r.

    LayerNorm spans the whole (C, rows, columns) map of one image (no affine), the mean
    counts the zero padding at the border, and every pooled patch vector is L2-normalised so
    that MSM can use inner products in place of distances.
    """
    n, num_patches, dim = tokens.shape
    rows, columns = grid_shape(num_patches, grid)
    maps = tokens.float().transpose(1, 2).reshape(n, dim, rows, columns)
    maps = F.layer_norm(maps, (dim, rows, columns))
    pooled_sets = []
    for r in r_list:
        pooled = maps if r == 1 else F.avg_pool2d(maps, r, stride=1, padding=r // 2)
        pooled_sets.append(F.normalize(pooled.flatten(2).transpose(1, 2), dim=-1))
    return pooled_sets
