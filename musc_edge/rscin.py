"""RsCIN: smooth image scores over look-alike images (docs/design.md, step 5).

An image whose nearest neighbours (by global embedding) score low is probably normal even if
one patch scored high by chance; averaging over k neighbours for several k damps such noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def min_max(values: torch.Tensor) -> torch.Tensor:
    """Scale to [0, 1]; a constant vector maps to zeros rather than NaN."""
    spread = values.max() - values.min()
    if spread <= 0:
        return torch.zeros_like(values)
    return (values - values.min()) / spread


def rscin(
    raw_scores: torch.Tensor, embeddings: torch.Tensor, k_list: Sequence[int]
) -> torch.Tensor:
    """(N,) raw scores and (N, D) embeddings -> (N,) smoothed scores.

    For each k, row i of the similarity W = E E^T keeps its k largest entries (itself
    included, k capped at N), normalised to sum 1; the result is the mean of the k-neighbour
    averages of the min-max normalised scores. Embeddings are always L2-normalised here.
    """
    scores = min_max(raw_scores.double())
    unit = F.normalize(embeddings.double(), dim=-1)
    similarity = unit @ unit.T
    smoothed = []
    for k in k_list:
        top = similarity.topk(min(k, len(scores)), dim=1)
        weights = torch.zeros_like(similarity).scatter_(1, top.indices, top.values)
        weights = weights / weights.sum(dim=1, keepdim=True)
        smoothed.append(weights @ scores)
    return torch.stack(smoothed).mean(dim=0).to(raw_scores.dtype)
