"""MSM in bands of query images: the part every MSM kernel shares.

A kernel only fills a band's best-match table; this module sizes the band so the table, the
top-K selection and the kernel's own scratch stay under the memory budget for any batch size,
and turns each table into patch scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from musc_edge.msm import neighbour_count

# fill(table, start, stop): table[b, j, p] = max_q of 1 - |z_(start+b) p - z_j q|^2 / 2 (the
# similarity <., .> for unit vectors) for the band [start, stop); the self entries
# (j == start + b) may hold anything, -inf replaces them.
FillBand = Callable[[torch.Tensor, int, int], None]

TABLE_ITEM = 4  # float32 best similarities
TOPK_ITEM = 4 + 8  # float32 value + int64 index of each kept entry


def half_squared_norms(z: torch.Tensor) -> torch.Tensor:
    """(N, L) fp32 |z|^2 / 2 of vectors in any dtype: what turns their products into distances,
    <a, b> - |a|^2 / 2 - |b|^2 / 2 = -|a - b|^2 / 2, for vectors no longer unit length."""
    return torch.linalg.vector_norm(z, dim=2, dtype=torch.float32).square_().div_(2)


def band_rows(
    num_images: int, num_patches: int, keep: int, budget_bytes: int, scratch_bytes: int
) -> int:
    """Query images per band: their table and top-K output fit what the kernel's scratch leaves.

    One image at the least, so with a budget below a single row the scratch is one row.
    """
    per_row = num_patches * (num_images * TABLE_ITEM + keep * TOPK_ITEM)
    return max(1, min(num_images, (budget_bytes - scratch_bytes) // per_row))


def msm_by_bands(
    z: torch.Tensor, frac: float, budget_bytes: int, scratch_bytes: int, fill: FillBand
) -> torch.Tensor:
    """(N, L, C) unit vectors -> (N, L) MSM patch scores, the band tables filled by `fill`.

    `z` gives the shape and device; `scratch_bytes` is what `fill` holds at its peak.
    """
    num_images, num_patches, _ = z.shape
    scores = torch.zeros(num_images, num_patches, device=z.device)
    if num_images == 1:
        return scores
    keep = neighbour_count(num_images, frac)
    rows = band_rows(num_images, num_patches, keep, budget_bytes, scratch_bytes)
    table = torch.empty(rows, num_images, num_patches, device=z.device)
    for start in range(0, num_images, rows):
        stop = min(start + rows, num_images)
        band = table[: stop - start]
        fill(band, start, stop)
        own = torch.arange(stop - start, device=z.device)
        band[own, own + start] = -math.inf
        best = band.topk(keep, dim=1, sorted=False).values
        scores[start:stop] = best.mul_(-2).add_(2).clamp_min_(0).sqrt_().mean(dim=1)
    return scores
