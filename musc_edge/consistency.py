"""A guard for repeated defects when no known-good parts are at hand.

Mutual scoring trusts look-alikes: a patch that resembles patches in the closest 30 % of the
other images scores as normal. A defect that repeats (a worn tool, a dirty lens) has exactly
that many look-alikes, in the parts that share it, and none in the rest. A normal patch is
close to most images; a one-off defect is far from all of them; a repeated defect is close to a
few and far from the median image. So per patch the guard takes the distance to the median
image minus MSM's mean over the K closest, and per image its largest value (the idea of
"consistent anomalies" in CoDeGraph, arXiv 2510.10456, reduced to one statistic).

An image is flagged when that value is an outlier of its batch (median + 3.5 sigma) and at
least two other outliers peak within one patch of the same place: a repeated defect repeats
where it is, a lone outlier is noise. Measured in docs/verdicts.md; it flags, it does not
change the scores.
"""

from __future__ import annotations

import torch

from musc_edge.msm.finish import distances
from musc_edge.msm.plan import neighbour_count
from musc_edge.robust import outlier_threshold

MIN_GROUP = 3  # flagged images that must peak at the same place


def consistency_scores(z: torch.Tensor, frac: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L, C) unit vectors -> per image the largest (median - K-closest mean) distance over
    its patches, and the patch where it peaks."""
    count, patches, width = z.shape
    keep = neighbour_count(count, frac)
    flat = z.reshape(-1, width)
    values, places = torch.zeros(count), torch.zeros(count, dtype=torch.long)
    for i in range(count):
        best = (z[i] @ flat.T).view(patches, count, patches).amax(dim=2).float()
        nearest = distances(best)
        others = torch.cat([nearest[:, :i], nearest[:, i + 1 :]], dim=1).sort(dim=1).values
        gap = others[:, (count - 1) // 2] - others[:, :keep].mean(dim=1)
        values[i], places[i] = gap.max(), gap.argmax()
    return values, places


def repeated_group(values: torch.Tensor, places: torch.Tensor, columns: int) -> torch.Tensor:
    """(N,) bool: outliers of the batch that peak within one patch of two or more others."""
    limit = outlier_threshold(values.tolist())
    if limit is None:
        return torch.zeros_like(values, dtype=torch.bool)
    outliers = values > limit
    rows, cols = places // columns, places % columns
    near = ((rows[:, None] - rows[None]).abs() <= 1) & ((cols[:, None] - cols[None]).abs() <= 1)
    near &= outliers[:, None] & outliers[None]
    return outliers & (near.sum(dim=1) >= MIN_GROUP)


def guard_set(sets: list[torch.Tensor], num_r: int) -> torch.Tensor:
    """The pooled set the guard reads: the second chosen block (the first alone when there is
    one) at the middle neighbourhood size, where the bottle measurement found it clearest."""
    layer = min(1, len(sets) // num_r - 1)
    return sets[layer * num_r + num_r // 2]


def repeated_in_batch(
    sets: list[torch.Tensor], num_r: int, frac: float, columns: int
) -> torch.Tensor:
    """(N,) bool flags of the zero-shot repeated-defect guard for one batch; `columns`: of
    the patch grid, rows run after each other."""
    z = guard_set(sets, num_r)
    if z.shape[0] < 2 * MIN_GROUP:
        return torch.zeros(z.shape[0], dtype=torch.bool)
    values, places = consistency_scores(z, frac)
    return repeated_group(values, places, columns)
