"""How much of MSM's best-match table is held at once: the one memory planner.

MSM fills a table `best[i, j, p] = max_q <z_ip, z_jq>` for a band of query images i against
every image j, picks the K best entries per patch and discards the band. Sizing the band so
that the table, the top-K selection and a backend's own scratch fit the budget keeps memory
bounded whatever the batch size.
"""

from __future__ import annotations

import math

FLOAT32_BYTES = 4  # one best similarity in the table, one kept top-K value
INDEX_BYTES = 8  # one int64 top-K index


def neighbour_count(num_images: int, frac: float) -> int:
    """K, how many of the closest other images a patch score averages over.

    `max(1, ...)`: the original has no floor and returns NaN for batches under 5.
    """
    return max(1, math.floor(frac * (num_images - 1)))


def band_rows(
    num_queries: int,
    num_images: int,
    num_patches: int,
    keep: int,
    budget_bytes: int,
    scratch_bytes: int,
) -> int:
    """Query images per band: their (rows, N, L) table and top-K output fit what the backend's
    scratch leaves of the budget. One image at the least, so a tiny budget still works."""
    per_row = num_patches * (num_images * FLOAT32_BYTES + keep * (FLOAT32_BYTES + INDEX_BYTES))
    return max(1, min(num_queries, (budget_bytes - scratch_bytes) // per_row))
