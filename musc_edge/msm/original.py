"""The original backend: MSM the way the original MuSc code computes it, the yardstick for
speed and memory in `musc-edge bench --compare-original`.

Per query image, `torch.cdist` of its L patches against the (N - 1) L patches of all other
images (an L x (N - 1) L float32 block, 1.5 GB at N=200, L=1369), the minimum per other image,
then the mean of the K smallest. No symmetry, no bound on memory. `amin` stands in for the
original's `torch.min(...)[0]` (same values, same speed measured here), and K uses the same
max(1, ...) as the rest of musc-edge; the original has no floor and returns NaN for N < 5.
"""

from __future__ import annotations

import torch

from musc_edge.msm.plan import neighbour_count


def original_msm(z: torch.Tensor, frac: float, num_queries: int) -> torch.Tensor:
    """(N, L, C) unit vectors -> (num_queries, L) float32 patch scores, original-style."""
    num_images, num_patches, dim = z.shape
    z = z.float()
    scores = torch.zeros(num_queries, num_patches, device=z.device)
    if num_images == 1:
        return scores
    keep = neighbour_count(num_images, frac)
    for i in range(num_queries):
        others = torch.cat([z[:i], z[i + 1 :]]).reshape(-1, dim)
        dist = torch.cdist(z[i], others).view(num_patches, num_images - 1, num_patches)
        nearest = dist.amin(dim=2)
        scores[i] = nearest.topk(keep, dim=1, largest=False).values.mean(dim=1)
    return scores
