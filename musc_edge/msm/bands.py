"""The band driver every table-filling backend shares.

A backend only fills band tables; this module walks the query images in bands sized by the
planner, blanks each image's vote for itself and hands the table to the finishing step.
Queries are the first `num_queries` images of `z`; the rest are references: they vote in
every query's score but receive none themselves (a rolling window, a known-good bank).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from musc_edge.msm import finish
from musc_edge.msm.plan import band_rows, neighbour_count

# fill(table, start, stop): table[b, j, p] = max_q <z_(start+b) p, z_j q> for every image j.
# Pairs with both images inside [start, stop) may be computed once for both directions; the
# self entries (j == start + b) may hold anything, the driver overwrites them with -inf.
FillBand = Callable[[torch.Tensor, int, int], None]


def image_tiles(start: int, stop: int, tile: int) -> list[tuple[int, int]]:
    """Consecutive [a, b) ranges of at most `tile` images covering [start, stop)."""
    return [(a, min(a + tile, stop)) for a in range(start, stop, tile)]


def outside_tiles(start: int, stop: int, num_images: int, tile: int) -> list[tuple[int, int]]:
    """Tiles of every image outside the band [start, stop): row results only."""
    return image_tiles(0, start, tile) + image_tiles(stop, num_images, tile)


def score_bands(
    z: torch.Tensor,
    frac: float,
    budget_bytes: int,
    fill: FillBand,
    scratch_bytes: int,
    num_queries: int,
) -> torch.Tensor:
    """(N, L, C) unit vectors -> (num_queries, L) patch scores, tables filled by `fill`.

    `scratch_bytes` is what `fill` holds at its peak. A lone image has nothing to compare
    with and scores 0 everywhere.
    """
    num_images, num_patches, _ = z.shape
    scores = torch.zeros(num_queries, num_patches, device=z.device)
    if num_images == 1:
        return scores
    keep = neighbour_count(num_images, frac)
    rows = band_rows(num_queries, num_images, num_patches, keep, budget_bytes, scratch_bytes)
    table = torch.empty(rows, num_images, num_patches, device=z.device)
    for start in range(0, num_queries, rows):
        stop = min(start + rows, num_queries)
        band = table[: stop - start]
        fill(band, start, stop)
        own = torch.arange(stop - start, device=z.device)
        band[own, own + start] = -math.inf
        scores[start:stop] = finish.band_scores(band, keep)
    return scores
