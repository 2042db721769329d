"""Query-vs-references scoring for rolling mode: one new image against a window of others.

The same patch score as batch MuSc, seen from one image: for every layer and r, each patch's
distance to its nearest patch in each of the R reference images, averaged over the
K = max(1, floor(frac * R)) smallest. It reuses the core's LNAMD and its bounded best-match
table with the query as a band of one, so it matches `MuSc` on the same R + 1 images exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from musc_edge.lnamd import lnamd
from musc_edge.msm import best_match_table, neighbour_count, plan_blocks


@torch.no_grad()
def reference_patch_scores(
    query: Sequence[torch.Tensor],
    references: Sequence[torch.Tensor],
    r_list: Sequence[int],
    frac: float,
    dtype: torch.dtype = torch.float32,
    budget_bytes: int = 256 * 2**20,
) -> torch.Tensor:
    """(L,) patch scores of one image from its (L, C) tokens per layer and (R, L, C) references.

    With no reference the scores are 0, as the core defines a batch of one.
    """
    num_refs, num_patches = references[0].shape[:2]
    if num_refs == 0:
        return torch.zeros(num_patches, device=query[0].device)
    k = neighbour_count(num_refs + 1, frac)
    _, tile = plan_blocks(num_refs + 1, num_patches, budget_bytes)
    total, num_sets = None, 0
    for layer_query, layer_refs in zip(query, references, strict=True):
        for z in lnamd(torch.cat([layer_query[None], layer_refs.to(layer_query)]), r_list):
            best = best_match_table(z, 0, 1, tile, dtype).topk(k, dim=1).values
            scores = (2 - 2 * best[0]).clamp_min(0).sqrt().mean(dim=0)
            total = scores if total is None else total + scores
            num_sets += 1
    return total / num_sets
