"""`musc_edge::lnamd`: LNAMD pooling for every r at once, as two small band-matrix products.

The zero-padded r x r mean is separable and linear: a sum over |dw| <= r // 2 along the grid's
columns, then the same along its rows (the padded zeros simply have no term). Stacking the
column band matrices of all r turns the first sum into one product over the tokens, so they
are read once; the row sums are one product per r written straight into the output. The
final L2 normalisation cancels every positive per-image factor, so LayerNorm's division by
the standard deviation and the 1/r^2 are never applied: pooling the mean-centred tokens gives
the same unit vectors. Sums of at most r float32 terms keep the plain form's accuracy.

The op is bandwidth-bound and a few percent of a MuSc run at most, so the kernel is plain torch
code registered for CPU and CUDA alike; the work that needs custom kernels is MSM
(`musc_edge.msm`). `musc_edge.lnamd` holds the plain form it is tested against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from musc_edge.lnamd import Grid, grid_shape


def band_matrices(side: int, r_list: Sequence[int], device: torch.device) -> torch.Tensor:
    """(R, side, side) 0/1 matrices, entry (a, b) = 1 where |a - b| <= r // 2."""
    index = torch.arange(side, device=device)
    offset = (index[:, None] - index[None, :]).abs()
    return torch.stack([(offset <= r // 2).float() for r in r_list])


@torch.library.custom_op("musc_edge::lnamd", mutates_args=(), device_types=("cpu", "cuda"))
def lnamd_op(tokens: torch.Tensor, r_list: list[int], grid: list[int]) -> torch.Tensor:
    """(N, L, C) tokens on a (rows, columns) grid -> (len(r_list), N, L, C) float32 unit
    vectors, one set per r."""
    n, num_patches, dim = tokens.shape
    rows, columns = grid
    sets = len(r_list)
    row_bands = band_matrices(rows, r_list, tokens.device)
    column_bands = band_matrices(columns, r_list, tokens.device)
    values = tokens.float()
    centred = (values - values.mean(dim=(1, 2), keepdim=True)).view(n * rows, columns, dim)
    # sums along each grid row for every r at once: (N*rows, R*columns, C)
    cols = torch.matmul(column_bands.view(sets * columns, columns), centred)
    cols = cols.view(n, rows, sets, columns * dim)
    out = torch.empty(sets, n, rows, columns * dim, device=tokens.device)
    for index in range(sets):
        torch.matmul(row_bands[index], cols[:, :, index], out=out[index])
    out = out.view(sets, n, num_patches, dim)
    return out.div_(torch.linalg.vector_norm(out, dim=-1, keepdim=True).clamp_min_(1e-12))


@lnamd_op.register_fake
def _lnamd_fake(tokens: torch.Tensor, r_list: list[int], grid: list[int]) -> torch.Tensor:
    return tokens.new_empty((len(r_list), *tokens.shape), dtype=torch.float32)


def lnamd(
    tokens: torch.Tensor, r_list: Sequence[int], grid: Grid | None = None
) -> list[torch.Tensor]:
    """`musc_edge.lnamd.lnamd` through the custom op: one (N, L, C) set per r."""
    shape = list(grid_shape(tokens.shape[1], grid))
    return list(torch.ops.musc_edge.lnamd(tokens, list(r_list), shape).unbind(0))
