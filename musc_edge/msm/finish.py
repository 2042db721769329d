"""The last step of MSM, in its one place: best similarities -> patch scores.

Vectors are unit length, so a best similarity s is a nearest-patch distance
`d = sqrt(max(0, 2 - 2 s))`; a patch's score is the mean of its K smallest distances over the
other images, i.e. of its K largest similarities.
"""

from __future__ import annotations

import torch


def distances(best: torch.Tensor) -> torch.Tensor:
    """Best similarities of unit vectors -> nearest-patch distances, in place (the one home of
    `sqrt(max(0, 2 - 2 s))`: MSM, the known-good bank and the repeated-defect guard)."""
    return best.mul_(-2).add_(2).clamp_min_(0).sqrt_()


def band_scores(table: torch.Tensor, keep: int) -> torch.Tensor:
    """(rows, N, L) best similarities (self entries -inf) -> (rows, L) patch scores."""
    return distances(table.topk(keep, dim=1, sorted=False).values).mean(dim=1)
