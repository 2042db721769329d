"""RsCIN: smooth image scores over look-alike images (docs/design.md, step 5).

An image whose nearest neighbours (by global embedding) score low is probably normal even if
one patch scored high by chance; averaging over k neighbours for several k damps such noise.

The original min-max normalises the raw scores first. Every row of the smoothing matrix sums
to 1, so smoothing commutes with any affine map: skipping the min-max gives the same ranking
within a batch (the same AUROC) and keeps the scores in patch-distance units, one scale for
every batch and window (docs/verdicts.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def rscin(
    raw_scores: torch.Tensor, embeddings: torch.Tensor, k_list: Sequence[int]
) -> torch.Tensor:
    """(N,) raw scores and (N, D) embeddings -> (N,) smoothed scores.

    For each k, row i of the similarity W = E E^T keeps its k largest entries (itself
    included, k capped at N), normalised to sum 1; the result is the mean of the k-neighbour
    averages of the raw scores. Embeddings are always L2-normalised here.
    """
    scores = raw_scores.double()
    unit = F.normalize(embeddings.double(), dim=-1)
    similarity = unit @ unit.T
    smoothed = []
    for k in k_list:
        top = similarity.topk(min(k, len(scores)), dim=1)
        weights = torch.zeros_like(similarity).scatter_(1, top.indices, top.values)
        weights = weights / weights.sum(dim=1, keepdim=True)
        smoothed.append(weights @ scores)
    return torch.stack(smoothed).mean(dim=0).to(raw_scores.dtype)
