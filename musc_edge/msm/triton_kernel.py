"""The triton backend: band tables from one fused Triton kernel (similarity tile, row and
column max, all on chip).

Each program takes one image pair (i, j) and a strip of BLOCK_M patches of image i, walks
over the patches of j in BLOCK_N tiles with fp32 accumulators, keeps the running row maxima
in registers and folds each tile's column maxima into the table with an atomic max, so no
L x L block ever reaches global memory and the only scratch is the band table itself.
Each tile holds 1 - |a - b|^2 / 2 (the products plus the vectors' half squared norms, in
fp32): for unit vectors that is the similarity, and for vectors rounded to fp16/bf16 it keeps
a patch's distance to its own copy at 0 instead of the ~0.05 that 2 - 2 <a, b> gives.

Importing this module needs Triton; `musc_edge.msm.backends` imports it only when the
backend is asked for, and the custom op only where Triton is installed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from musc_edge.msm.bands import FillBand
from musc_edge.msm.tiles import half_squared_norms

BLOCK_M = 64
BLOCK_N = 64
BLOCK_K = 32


@triton.jit
def _pair_max_kernel(
    z_ptr,
    half_norms_ptr,
    pairs_ptr,
    table_ptr,
    start,
    num_patches,
    dim,
    band_stride,
    image_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pair = tl.program_id(0)
    i = tl.load(pairs_ptr + 3 * pair)
    j = tl.load(pairs_ptr + 3 * pair + 1)
    j_row = tl.load(pairs_ptr + 3 * pair + 2)  # j's row in the band table, -1: rows only
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_patches
    image_i = z_ptr + i.to(tl.int64) * num_patches * dim
    image_j = z_ptr + j.to(tl.int64) * num_patches * dim
    row_half_norm = tl.load(half_norms_ptr + i * num_patches + rows, mask=row_ok, other=0.0)
    row_best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for n0 in range(0, num_patches, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < num_patches
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, dim, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < dim
            a = tl.load(
                image_i + rows[:, None] * dim + ks[None, :],
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            b = tl.load(
                image_j + cols[None, :] * dim + ks[:, None],
                mask=k_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            if UPCAST:  # the interpreter stores bf16 as raw uint16 and would multiply the bits
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        col_half_norm = tl.load(half_norms_ptr + j * num_patches + cols, mask=col_ok, other=0.0)
        acc += 1.0 - row_half_norm[:, None] - col_half_norm[None, :]
        acc = tl.where(row_ok[:, None] & col_ok[None, :], acc, float("-inf"))
        row_best = tl.maximum(row_best, tl.max(acc, axis=1))
        if j_row >= 0:
            col_dst = table_ptr + j_row.to(tl.int64) * band_stride + i * image_stride + cols
            tl.atomic_max(col_dst, tl.max(acc, axis=0), mask=col_ok)
    row_dst = table_ptr + (i - start).to(tl.int64) * band_stride + j * image_stride + rows
    tl.store(row_dst, row_best, mask=row_ok)


def band_pairs(num_images: int, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """(P, 3) int32 rows (i, j, j's band row or -1): each in-band pair once, then i x outside."""
    band = torch.arange(start, stop)
    i, j = torch.triu_indices(stop - start, stop - start, offset=1) + start
    outside = torch.cat([torch.arange(0, start), torch.arange(stop, num_images)])
    oi, oj = band.repeat_interleave(len(outside)), outside.repeat(len(band))
    pairs = torch.stack(
        [torch.cat([i, oi]), torch.cat([j, oj]), torch.cat([j - start, torch.full_like(oj, -1)])],
        dim=1,
    )
    return pairs.to(device=device, dtype=torch.int32).contiguous()


def fill_band_triton(z: torch.Tensor, table: torch.Tensor, start: int, stop: int) -> None:
    """Fill the band table of [start, stop) with the fused kernel; `z` contiguous, any dtype.

    fp32 inputs use exact IEEE products (no TF32); fp16/bf16 accumulate in fp32.
    """
    num_images, num_patches, dim = z.shape
    pairs = band_pairs(num_images, start, stop, z.device)
    half_norms = half_squared_norms(z)
    table.fill_(float("-inf"))  # the atomic column maxima start from here
    grid = (len(pairs), triton.cdiv(num_patches, BLOCK_M))
    _pair_max_kernel[grid](
        z,
        half_norms,
        pairs,
        table,
        start,
        num_patches,
        dim,
        table.stride(0),
        table.stride(1),
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        INPUT_PRECISION="ieee" if z.dtype == torch.float32 else "tf32",
        UPCAST=z.device.type == "cpu" and z.dtype == torch.bfloat16,
    )


def prepare(z: torch.Tensor, dtype: torch.dtype, budget_bytes: int) -> tuple[FillBand, int]:
    """The fused kernel over `z` in `dtype`; its only scratch is the band table itself."""
    zc = z.to(dtype).contiguous()

    def fill(table: torch.Tensor, start: int, stop: int) -> None:
        fill_band_triton(zc, table, start, stop)

    return fill, 0
