"""`musc_edge::msm`: the MSM custom op, its CPU and CUDA kernels, fake impl and entry point."""

from __future__ import annotations

import functools
import warnings
from functools import partial
from types import ModuleType

import torch

from musc_edge.ops.bands import msm_by_bands
from musc_edge.ops.tiles import block_bytes, tile_filler

# Bytes of one CPU product block (key_tile x L x L): it stays in the L3 cache (32 MiB here)
# between the matmul writing it and the two reductions reading it, and large tiles keep the
# per-call overhead low; 8 and 16 MiB measured within noise of each other (docs/ops.md).
CPU_BLOCK_BYTES = 16 * 2**20


@functools.cache
def triton_module() -> ModuleType | None:
    """The Triton kernel module, or None where Triton is missing (e.g. JetPack torch)."""
    try:
        from musc_edge.ops import triton_msm
    except ImportError:
        return None
    return triton_msm


@torch.library.custom_op("musc_edge::msm", mutates_args=(), device_types="cpu")
def msm_op(z: torch.Tensor, frac: float, budget_bytes: int, dtype: torch.dtype) -> torch.Tensor:
    """CPU kernel: each query image against L3-sized tiles of key images (at most half the
    budget for small budgets).

    fp16 computes in exact fp32: x86 CPUs without AVX512-FP16 have no fast fp16 matmul.
    """
    if dtype == torch.float16:
        dtype = torch.float32
    return tiled_msm(z, frac, budget_bytes, dtype, min(CPU_BLOCK_BYTES, budget_bytes // 2))


@msm_op.register_kernel("cuda")
def _msm_cuda(z: torch.Tensor, frac: float, budget_bytes: int, dtype: torch.dtype) -> torch.Tensor:
    """CUDA kernel: the fused Triton kernel, or cuBLAS tiles taking half the budget."""
    triton_msm = triton_module()
    if triton_msm is None:
        return tiled_msm(z, frac, budget_bytes, dtype, budget_bytes // 2)
    zc = z.to(dtype).contiguous()
    return msm_by_bands(z, frac, budget_bytes, 0, partial(triton_msm.fill_band_triton, zc))


def tiled_msm(
    z: torch.Tensor, frac: float, budget_bytes: int, dtype: torch.dtype, block_budget: int
) -> torch.Tensor:
    """MSM from matmul tiles whose (key_tile, L, L) product block fits `block_budget` bytes."""
    num_patches = z.shape[1]
    item = torch.empty((), dtype=dtype).element_size()
    key_tile = max(1, block_budget // (item * num_patches * num_patches))
    scratch = block_bytes(num_patches, key_tile, dtype)
    return msm_by_bands(z, frac, budget_bytes, scratch, tile_filler(z, dtype, key_tile))


@msm_op.register_fake
def _msm_fake(z: torch.Tensor, frac: float, budget_bytes: int, dtype: torch.dtype) -> torch.Tensor:
    return z.new_empty(z.shape[:2], dtype=torch.float32)


def msm_scores(
    z: torch.Tensor,
    frac: float = 0.3,
    budget_bytes: int = 256 * 2**20,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Drop-in for `musc_edge.msm.msm_scores` through the custom op: (N, L, C) -> (N, L)."""
    if dtype == torch.float16 and z.device.type == "cpu":
        warnings.warn(
            "fp16 MSM on CPU computes in fp32 (no fast fp16 matmul on x86); bf16 is the fast mode",
            stacklevel=2,
        )
    return torch.ops.musc_edge.msm(z, frac, budget_bytes, dtype)
