"""`musc_edge::msm`, the custom op MuSc calls by default: CPU and CUDA kernels, fake impl.

The CPU kernel is the tiles backend; the CUDA kernel the fused Triton one, or the tiles
backend where Triton is missing (JetPack's torch, for one). Registering it as an op lets
`torch.compile` and `opcheck` treat MSM as one opaque, shape-known call.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from musc_edge.msm import tiles
from musc_edge.msm.bands import score_bands


@functools.cache
def triton_module() -> ModuleType | None:
    """The Triton kernel module, or None where Triton is missing."""
    try:
        from musc_edge.msm import triton_kernel
    except ImportError:
        return None
    return triton_kernel


@torch.library.custom_op("musc_edge::msm", mutates_args=(), device_types="cpu")
def msm_op(
    z: torch.Tensor, frac: float, budget_bytes: int, dtype: torch.dtype, num_queries: int
) -> torch.Tensor:
    """(N, L, C) unit vectors -> (num_queries, L) patch scores; the first num_queries images
    are scored, the others only vote."""
    fill, scratch = tiles.prepare(z, dtype, budget_bytes)
    return score_bands(z, frac, budget_bytes, fill, scratch, num_queries)


@msm_op.register_kernel("cuda")
def _msm_cuda(
    z: torch.Tensor, frac: float, budget_bytes: int, dtype: torch.dtype, num_queries: int
) -> torch.Tensor:
    kernel = triton_module() or tiles
    fill, scratch = kernel.prepare(z, dtype, budget_bytes)
    return score_bands(z, frac, budget_bytes, fill, scratch, num_queries)


@msm_op.register_fake
def _msm_fake(
    z: torch.Tensor, frac: float, budget_bytes: int, dtype: torch.dtype, num_queries: int
) -> torch.Tensor:
    return z.new_empty((num_queries, z.shape[1]), dtype=torch.float32)
