"""The tiles backend: band tables from matmul tiles with a max/min epilogue. The CPU kernel,
and the CUDA path where Triton is missing.

One query image against a tile of key images is one matmul writing a (tile, L, L) block into a
reused buffer, read back by two reductions (rows for the query, columns for the keys); the tile
size decides where that round trip lands (the L3 cache on a CPU, a bounded slice of device
memory on a GPU).

fp32 blocks hold similarities, reduced by amax. fp16/bf16 blocks hold half squared distances:
queries [-z', 1, 1, h, l] and keys [z', h, l, 1, 1] (z' = z rounded to the dtype, h + l =
|z'|^2 / 2 split into two terms of that dtype) give |a'|^2 / 2 + |b'|^2 / 2 - <a', b'> =
|a' - b'|^2 / 2, accumulated in fp32. This removes two errors of 2 - 2 <a', b'>: rounded
vectors are no longer unit length, which puts a patch ~0.05 away from its own copy; and the
matmul's half-precision output is rounded relative to d^2 / 2, a relative error under 2^-9
in d, instead of relative to s near 1, up to 2^-9 absolute in s and far more in d. Those
blocks are non-negative (up to fp32 accumulation error at d ~ 0), so they reduce through their
int16 bit patterns, which sort the same and reduce ~8x faster in torch than bf16 values.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from musc_edge.msm.bands import FillBand, image_tiles, outside_tiles

# Bytes of one CPU product block (key_tile x L x L): it stays in the L3 cache (32 MiB here)
# between the matmul writing it and the two reductions reading it, and large tiles keep the
# per-call overhead low; 8 and 16 MiB measured within noise of each other (docs/ops.md).
CPU_BLOCK_BYTES = 16 * 2**20


def half_squared_norms(z: torch.Tensor) -> torch.Tensor:
    """(N, L) fp32 |z|^2 / 2 of vectors in any dtype: what turns their products into distances,
    <a, b> - |a|^2 / 2 - |b|^2 / 2 = -|a - b|^2 / 2, for vectors no longer unit length."""
    return torch.linalg.vector_norm(z, dim=2, dtype=torch.float32).square_().div_(2)


def block_bytes(num_patches: int, key_tile: int, dtype: torch.dtype) -> int:
    """Peak scratch of `fill_band_tiles`: the product block and its two reductions."""
    item = torch.empty((), dtype=dtype).element_size()
    return key_tile * num_patches * (num_patches + 2) * item


def distance_operands(z: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(queries, keys), (N, L, C + 4) in `dtype`: their products are |a' - b'|^2 / 2."""
    rounded = z.to(dtype)
    half_norm = half_squared_norms(rounded).unsqueeze(2)
    hi = half_norm.to(dtype)
    lo = (half_norm - hi.float()).to(dtype)
    ones = torch.ones_like(hi)
    queries = torch.cat([-rounded, ones, ones, hi, lo], dim=2)
    keys = torch.cat([rounded, hi, lo, ones, ones], dim=2)
    return queries, keys


def largest_similarity(block: torch.Tensor, dim: int) -> torch.Tensor:
    """Max of fp32 similarities along `dim`."""
    return block.amax(dim=dim)


def smallest_distance(block: torch.Tensor, dim: int) -> torch.Tensor:
    """Min of non-negative half floats along `dim`, through their int16 bit patterns."""
    return block.view(torch.int16).amin(dim=dim).view(block.dtype)


def pair_blocks(query: torch.Tensor, keys: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """(k, L, L) products [j, p of the query, q of key j] of one query image with k keys.

    fp32 goes to MKL as a batch with a stride-0 query, each thread finishing whole pairs in
    its cache (measured ~8% faster than one plain product); oneDNN would copy that broadcast
    query for fp16/bf16, so half dtypes run one plain product of all keys against the query
    and hand back its transposed view (~7% faster than the batch).
    """
    num_keys, num_patches, dim = keys.shape
    if query.dtype == torch.float32:
        wide = query.expand(num_keys, num_patches, dim)
        return torch.bmm(wide, keys.transpose(1, 2), out=out.view(num_keys, num_patches, -1))
    flat = torch.mm(keys.reshape(-1, dim), query.T, out=out.view(num_keys * num_patches, -1))
    return flat.view(num_keys, num_patches, -1).transpose(1, 2)


def fill_band_tiles(
    queries: torch.Tensor,
    keys: torch.Tensor,
    table: torch.Tensor,
    start: int,
    stop: int,
    *,
    key_tile: int,
    best: Callable[[torch.Tensor, int], torch.Tensor],
) -> None:
    """Fill the band table of [start, stop) with the `best` entry of each row and column of
    every pair's product block.

    Pairs inside the band are computed once and give row results to the query image and column
    results to the key image; pairs with an image outside the band give row results only.
    """
    num_images, num_patches, _ = queries.shape
    buffer = queries.new_empty(key_tile * num_patches * num_patches)
    outside = outside_tiles(start, stop, num_images, key_tile)
    for i in range(start, stop):
        inside = image_tiles(i + 1, stop, key_tile)
        for (k0, k1), both in [(t, True) for t in inside] + [(t, False) for t in outside]:
            out = buffer[: (k1 - k0) * num_patches * num_patches]
            block = pair_blocks(queries[i], keys[k0:k1], out)
            table[i - start, k0:k1] = best(block, 2)
            if both:
                table[k0 - start : k1 - start, i] = best(block, 1)


def prepare(z: torch.Tensor, dtype: torch.dtype, budget_bytes: int) -> tuple[FillBand, int]:
    """A filler whose (key_tile, L, L) product block fits the L3 cache on a CPU (at most half
    the budget), half the budget on a GPU; and its peak scratch in bytes.

    fp16 on a CPU computes in exact fp32: x86 CPUs without AVX512-FP16 have no fast fp16
    matmul.
    """
    on_cpu = z.device.type == "cpu"
    if on_cpu and dtype == torch.float16:
        dtype = torch.float32
    block_budget = min(CPU_BLOCK_BYTES, budget_bytes // 2) if on_cpu else budget_bytes // 2
    num_patches = z.shape[1]
    item = torch.empty((), dtype=dtype).element_size()
    key_tile = max(1, block_budget // (item * num_patches * num_patches))
    return tile_filler(z, dtype, key_tile), block_bytes(num_patches, key_tile, dtype)


def tile_filler(z: torch.Tensor, dtype: torch.dtype, key_tile: int) -> FillBand:
    """`fill_band_tiles` over `z` in `dtype`: similarities in fp32, distances in fp16/bf16.

    The distance table is turned into 1 - min |a' - b'|^2 / 2, the similarity of unit vectors
    at the distance of the rounded ones, so the rest of MSM is the same for every dtype.
    """
    if dtype == torch.float32:
        zc = z.float().contiguous()
        return partial(fill_band_tiles, zc, zc, key_tile=key_tile, best=largest_similarity)
    queries, keys = distance_operands(z, dtype)

    def fill(table: torch.Tensor, start: int, stop: int) -> None:
        fill_band_tiles(
            queries, keys, table, start, stop, key_tile=key_tile, best=smallest_distance
        )
        table.neg_().add_(1)

    return fill
