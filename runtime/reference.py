"""Query-vs-references scoring for rolling mode: one new image against a window of others.

The same patch score as batch MuSc, seen from one image: for every layer and r, each patch's
distance to its nearest patch in each of the R reference images, averaged over the
K = max(1, floor(frac * R)) smallest. LNAMD is per image, so each image is pooled once, when
it arrives, and the window keeps the pooled sets; scoring reuses the core's bounded
best-match table with the query as a band of one, so it matches `MuSc` on the same images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from musc_edge.lnamd import lnamd
from musc_edge.msm import best_match_table, neighbour_count, plan_blocks


def pooled_sets(tokens: Sequence[torch.Tensor], r_list: Sequence[int]) -> list[torch.Tensor]:
    """One image's (L, C) tokens per layer -> its (L, C) unit vectors per (layer, r)."""
    return [z[0] for layer in tokens for z in lnamd(layer[None], r_list)]


@torch.no_grad()
def reference_patch_scores(
    query: Sequence[torch.Tensor],
    references: Sequence[torch.Tensor],
    frac: float,
    dtype: torch.dtype = torch.float32,
    budget_bytes: int = 256 * 2**20,
) -> torch.Tensor:
    """(L,) patch scores from the query's (L, C) pooled sets and the (R, L, C) references'.

    With no reference the scores are 0, as the core defines a batch of one.
    """
    num_refs, num_patches = references[0].shape[:2]
    if num_refs == 0:
        return torch.zeros(num_patches, device=query[0].device)
    k = neighbour_count(num_refs + 1, frac)
    _, tile = plan_blocks(num_refs + 1, num_patches, budget_bytes)
    total = torch.zeros(num_patches, device=query[0].device)
    for z_query, z_refs in zip(query, references, strict=True):
        z = torch.cat([z_query[None].to(z_refs.dtype), z_refs])
        best = best_match_table(z, 0, 1, tile, dtype).topk(k, dim=1).values
        total += (2 - 2 * best[0]).clamp_min(0).sqrt().mean(dim=0)
    return total / len(query)
