"""The plain torch backend: square similarity blocks of several images a side.

The simplest correct kernel, kept readable on purpose: the others are checked against the
same float64 oracle, and it runs anywhere torch does.
"""

from __future__ import annotations

import math

import torch

from musc_edge.msm.bands import FillBand, image_tiles, outside_tiles


def similarity_block(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(Q, L, K, L) inner products of every patch of Q query images with every key patch."""
    nq, num_patches, dim = queries.shape
    nk = keys.shape[0]
    sim = queries.reshape(nq * num_patches, dim) @ keys.reshape(nk * num_patches, dim).T
    return sim.view(nq, num_patches, nk, num_patches)


def prepare(z: torch.Tensor, dtype: torch.dtype, budget_bytes: int) -> tuple[FillBand, int]:
    """A filler whose (tile * L)^2 similarity block takes at most half the budget."""
    num_images, num_patches, _ = z.shape
    item = torch.empty((), dtype=dtype).element_size()
    tile = max(1, math.isqrt(budget_bytes // 2 // (num_patches * num_patches * item)))
    tile = min(tile, num_images)
    zc = z.to(dtype)

    def fill(table: torch.Tensor, start: int, stop: int) -> None:
        band = image_tiles(start, stop, tile)
        outside = outside_tiles(start, stop, num_images, tile)
        for index, (q0, q1) in enumerate(band):
            for k0, k1 in band[index:]:
                sim = similarity_block(zc[q0:q1], zc[k0:k1])
                table[q0 - start : q1 - start, k0:k1] = sim.amax(dim=3).transpose(1, 2).float()
                table[k0 - start : k1 - start, q0:q1] = sim.amax(dim=1).permute(1, 0, 2).float()
            for k0, k1 in outside:
                sim = similarity_block(zc[q0:q1], zc[k0:k1])
                table[q0 - start : q1 - start, k0:k1] = sim.amax(dim=3).transpose(1, 2).float()

    return fill, tile * tile * num_patches * num_patches * item
