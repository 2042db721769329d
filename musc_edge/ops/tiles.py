"""Band tables from matrix-product tiles with a max epilogue: the CPU kernel and the CUDA path
when Triton is missing.

The similarity block of a query tile against a key tile is written by the matmul and read back
by two amax reductions; sizing the tiles decides where that round trip lands (cache on the
CPU, a bounded slice of device memory on a GPU).
"""

from __future__ import annotations

import torch


def image_tiles(start: int, stop: int, tile: int) -> list[tuple[int, int]]:
    """Consecutive [a, b) ranges of at most `tile` images covering [start, stop)."""
    return [(a, min(a + tile, stop)) for a in range(start, stop, tile)]


def block_bytes(num_patches: int, query_tile: int, key_tile: int, dtype: torch.dtype) -> int:
    """Scratch of one similarity block plus its two maxima, the peak of `fill_band_tiles`."""
    item = torch.empty((), dtype=dtype).element_size()
    block = query_tile * key_tile * num_patches * num_patches * item
    return block + 2 * query_tile * key_tile * num_patches * item


def fill_band_tiles(
    z: torch.Tensor,
    table: torch.Tensor,
    start: int,
    stop: int,
    query_tile: int,
    key_tile: int,
) -> None:
    """Fill the band table of [start, stop) from (query_tile x key_tile image) similarity blocks.

    Pairs inside the band are computed once and give row maxima to the query image and column
    maxima to the key image; pairs with an image outside the band give row maxima only.
    """
    num_images, num_patches, dim = z.shape
    flat = z.reshape(num_images * num_patches, dim)
    outside = image_tiles(0, start, key_tile) + image_tiles(stop, num_images, key_tile)
    for q0, q1 in image_tiles(start, stop, query_tile):
        queries = flat[q0 * num_patches : q1 * num_patches]
        # a single query image skips its own pair; a larger tile needs its diagonal block
        inside = image_tiles(q1 if q1 - q0 == 1 else q0, stop, key_tile)
        for (k0, k1), both in [(t, True) for t in inside] + [(t, False) for t in outside]:
            keys = flat[k0 * num_patches : k1 * num_patches]
            block = (queries @ keys.T).view(q1 - q0, num_patches, k1 - k0, num_patches)
            table[q0 - start : q1 - start, k0:k1] = block.amax(dim=3).transpose(1, 2)
            if both:
                table[k0 - start : k1 - start, q0:q1] = block.amax(dim=1).transpose(0, 1)
