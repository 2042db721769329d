"""A bounded known-good bank: greedy k-centre selection of patches (PatchCore's coreset).

Every scored patch is compared with every bank patch, so the time per part grows with the
good parts taught. Keeping the patches that cover the others best (each new one the farthest
from those already kept) bounds that time however many parts a calibration sees, and drops
mostly near-duplicates: most patches of good parts look like many others.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

PROJECTION_DIM = 128  # distances in a random projection: the selection's cost, not its result


def k_centre(sets: Sequence[torch.Tensor], count: int, seed: int = 0) -> torch.Tensor:
    """Indices of `count` patches of (N, L, C) pooled sets (flattened N * L), chosen greedily
    each farthest from those before, in one random projection of all sets together (so one
    choice serves every set and the bank keeps whole patch descriptions)."""
    generator = torch.Generator().manual_seed(seed)
    projected = None
    for z in sets:
        flat = z.reshape(-1, z.shape[-1]).float()
        matrix = torch.randn(flat.shape[1], PROJECTION_DIM, generator=generator).to(flat)
        part = flat @ matrix
        projected = part if projected is None else projected + part
    total = projected.shape[0]
    count = min(count, total)
    chosen = torch.empty(count, dtype=torch.long)
    chosen[0] = 0
    nearest = (projected - projected[0]).square().sum(dim=1)
    for index in range(1, count):
        farthest = int(nearest.argmax())
        chosen[index] = farthest
        torch.minimum(nearest, (projected - projected[farthest]).square().sum(dim=1), out=nearest)
    return chosen
