"""The last step of MSM, in its one place: best similarities -> patch scores.

Vectors are unit length, so a best similarity s is a nearest-patch distance
`d = sqrt(max(0, 2 - 2 s))`; a patch's score is the mean of its K smallest distances over the
other images, i.e. of its K largest similarities.
"""

from __future__ import annotations

import torch


def band_scores(table: torch.Tensor, keep: int) -> torch.Tensor:
    """(rows, N, L) best similarities (self entries -inf) -> (rows, L) patch scores."""
    best = table.topk(keep, dim=1, sorted=False).values
    return best.mul_(-2).add_(2).clamp_min_(0).sqrt_().mean(dim=1)
