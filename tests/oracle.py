"""The float64 test oracle: MuSc transcribed from docs/design.md for clarity, not speed.

Independent of the package's code paths: explicit padding and shifted sums for the
neighbourhood mean, cdist per image pair for MSM, explicit top-k rows for RsCIN.
"""

from __future__ import annotations

import math

import torch


def lnamd_f64(tokens: torch.Tensor, r: int) -> torch.Tensor:
    n, num_patches, dim = tokens.shape
    side = math.isqrt(num_patches)
    grid = tokens.double().transpose(1, 2).reshape(n, dim, side, side)
    mean = grid.mean(dim=(1, 2, 3), keepdim=True)
    var = grid.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    grid = (grid - mean) / torch.sqrt(var + 1e-5)
    pad = r // 2
    padded = torch.nn.functional.pad(grid, (pad, pad, pad, pad))
    total = torch.zeros_like(grid)
    for dy in range(r):
        for dx in range(r):
            total += padded[:, :, dy : dy + side, dx : dx + side]
    pooled = (total / (r * r)).reshape(n, dim, num_patches).transpose(1, 2)
    return pooled / pooled.norm(dim=-1, keepdim=True)


def msm_f64(z: torch.Tensor, frac: float = 0.3) -> torch.Tensor:
    """(N, L) patch scores of every image against all the others."""
    z = z.double()
    n, num_patches, _ = z.shape
    if n == 1:
        return torch.zeros(1, num_patches, dtype=torch.float64)
    k = max(1, math.floor(frac * (n - 1)))
    scores = torch.empty(n, num_patches, dtype=torch.float64)
    for i in range(n):
        distances = torch.stack(
            [torch.cdist(z[i], z[j]).amin(dim=1) for j in range(n) if j != i], dim=1
        )
        scores[i] = distances.sort(dim=1).values[:, :k].mean(dim=1)
    return scores


def rscin_f64(raw: torch.Tensor, embeddings: torch.Tensor, k_list) -> torch.Tensor:
    s = raw.double()  # on the raw scale: the original's min-max would only rescale (verdicts.md)
    e = embeddings.double()
    e = e / e.norm(dim=-1, keepdim=True)
    w = e @ e.T
    n = len(s)
    outputs = []
    for k in k_list:
        p = torch.zeros_like(w)
        for i in range(n):
            top = w[i].argsort(descending=True)[: min(k, n)]
            p[i, top] = w[i, top] / w[i, top].sum()
        outputs.append(p @ s)
    return torch.stack(outputs).mean(dim=0)


def musc_f64(tokens, embeddings, r_list=(1, 3, 5), frac=0.3, k_list=(1, 2, 3)):
    """(patch_maps, raw_scores, scores) in float64."""
    sets = [msm_f64(lnamd_f64(layer, r), frac) for layer in tokens for r in r_list]
    patch = torch.stack(sets).mean(dim=0)
    side = math.isqrt(patch.shape[1])
    raw = patch.amax(dim=1)
    return patch.view(-1, side, side), raw, rscin_f64(raw, embeddings, k_list)
