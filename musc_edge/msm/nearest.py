"""Distance of each query patch to the nearest patch of a bank of known-good images.

Mutual scoring asks "do the other images have a patch like this one?" and so misses a defect
that many parts share; the bank asks "does any known-good part have a patch like this one?",
which holds however many parts share the defect. Vectors are unit length, so the distance is
sqrt(2 - 2 * best cosine), one matrix product per block of query images.
"""

from __future__ import annotations

import torch

from musc_edge.msm.finish import distances
from musc_edge.msm.plan import FLOAT32_BYTES


def nearest_distances(
    queries: torch.Tensor,
    bank: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    budget_bytes: int = 256 * 2**20,
    leave_out: bool = False,
    origin: torch.Tensor | None = None,
) -> torch.Tensor:
    """(Q, L, C) queries, (R, L', C) or (M, C) bank -> (Q, L) distance to the nearest bank
    patch.

    `leave_out`: the queries are the parts the bank was made from, and each is compared with
    the others' patches only (the calibration's leave-one-out scores); `origin` (M,) names the
    part each bank patch came from (default: the bank's first axis). Blocks of query images
    are sized so their similarity table stays within `budget_bytes`.
    """
    num_queries, num_patches, width = queries.shape
    flat_bank = bank.reshape(-1, width).to(queries.device, dtype)  # no copy when it is there
    if leave_out and origin is None:
        origin = torch.arange(bank.shape[0], device=bank.device).repeat_interleave(bank.shape[1])
    per_image = num_patches * flat_bank.shape[0] * FLOAT32_BYTES
    rows = max(1, min(num_queries, budget_bytes // per_image))
    out = []
    for start in range(0, num_queries, rows):
        block = queries[start : start + rows].to(dtype)
        similarity = (block.reshape(-1, width) @ flat_bank.T).view(block.shape[0], num_patches, -1)
        if leave_out:
            own = torch.arange(start, start + block.shape[0], device=similarity.device)
            mine = origin.to(similarity.device)[None] == own[:, None]  # (rows, M)
            similarity.masked_fill_(mine[:, None, :], -1.0)
        # the maximum before widening: the same value, without a float32 copy of the table
        out.append(distances(similarity.amax(dim=2).float()))
    return torch.cat(out)
