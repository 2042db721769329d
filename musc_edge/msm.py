"""MSM: mutual scoring of patches across the images of a batch (DESIGN.md section 3, step 3).

The reference implementation in plain torch: matrix products of unit vectors with a max
epilogue, every unordered image pair computed once, scratch memory held under a budget
whatever the batch size. The custom ops of `musc_edge.ops` are tested against it.
"""

from __future__ import annotations

import math

import torch

BYTES_PER_FLOAT = 4


def neighbour_count(num_images: int, frac: float) -> int:
    """K, how many of the closest other images a patch score averages over."""
    return max(1, math.floor(frac * (num_images - 1)))


def plan_blocks(num_images: int, num_patches: int, budget_bytes: int) -> tuple[int, int]:
    """(band, tile): images per band of the best-match table and per side of a similarity tile.

    Half the budget holds the (band, N, L) table of best matches, half one
    (tile * L, tile * L) similarity block; both shrink to one image at the least.
    """
    half = budget_bytes // 2
    band = max(1, min(num_images, half // (num_images * num_patches * BYTES_PER_FLOAT)))
    tile = max(1, math.isqrt(half // (num_patches * num_patches * BYTES_PER_FLOAT)))
    return band, min(tile, num_images)


def similarity_block(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(Q, L, K, L) inner products of every patch of Q query images with every key patch."""
    nq, num_patches, dim = queries.shape
    nk = keys.shape[0]
    sim = queries.reshape(nq * num_patches, dim) @ keys.reshape(nk * num_patches, dim).T
    return sim.view(nq, num_patches, nk, num_patches)


def image_tiles(start: int, stop: int, tile: int) -> list[tuple[int, int]]:
    """Consecutive [a, b) ranges of at most `tile` images covering [start, stop)."""
    return [(a, min(a + tile, stop)) for a in range(start, stop, tile)]


def best_match_table(
    z: torch.Tensor, start: int, stop: int, tile: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(stop - start, N, L) best similarity of each band image's patches in every image.

    table[i, j, p] = max_q <z_ip, z_jq>. Pairs inside the band are computed once and serve
    both directions (row maxima for i, column maxima for j); pairs with an image outside the
    band are computed from the band's side only, which keeps the table bounded when the whole
    (N, N, L) table would not fit the budget. Self pairs are -inf so no image votes for itself.
    """
    n, num_patches, _ = z.shape
    zc = z.to(dtype)
    table = torch.empty(stop - start, n, num_patches, device=z.device)
    band_tiles = image_tiles(start, stop, tile)
    outside_tiles = image_tiles(0, start, tile) + image_tiles(stop, n, tile)
    for index, (q0, q1) in enumerate(band_tiles):
        for k0, k1 in band_tiles[index:]:
            sim = similarity_block(zc[q0:q1], zc[k0:k1])
            table[q0 - start : q1 - start, k0:k1] = sim.amax(dim=3).transpose(1, 2).float()
            table[k0 - start : k1 - start, q0:q1] = sim.amax(dim=1).permute(1, 0, 2).float()
        for k0, k1 in outside_tiles:
            sim = similarity_block(zc[q0:q1], zc[k0:k1])
            table[q0 - start : q1 - start, k0:k1] = sim.amax(dim=3).transpose(1, 2).float()
    rows = torch.arange(stop - start, device=z.device)
    table[rows, rows + start] = -math.inf
    return table


def msm_scores(
    z: torch.Tensor,
    frac: float = 0.3,
    budget_bytes: int = 256 * 2**20,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(N, L, C) unit vectors -> (N, L) patch scores: mean distance to the K closest images.

    `d_ij(p) = sqrt(max(0, 2 - 2 max_q <z_ip, z_jq>))`, the score of patch p of image i is the
    mean of its K smallest `d_ij(p)` over j != i. With a single image there is nothing to
    compare against and every score is 0.
    """
    n, num_patches, _ = z.shape
    if n == 1:
        return z.new_zeros(1, num_patches, dtype=torch.float32)
    k = neighbour_count(n, frac)
    band, tile = plan_blocks(n, num_patches, budget_bytes)
    scores = torch.empty(n, num_patches, device=z.device)
    for start in range(0, n, band):
        stop = min(start + band, n)
        best = best_match_table(z, start, stop, tile, dtype).topk(k, dim=1).values
        scores[start:stop] = (2 - 2 * best).clamp_min(0).sqrt().mean(dim=1)
    return scores
