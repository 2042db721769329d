"""One selector over every way to compute MSM, so callers name a backend, never a module.

- `op` (default): the `musc_edge::msm` custom op, which picks the kernel for the device.
- `torch`: plain torch similarity blocks, the readable baseline.
- `tiles`: L3-sized matmul tiles, exact fp32 or distance-form bf16 (the op's CPU kernel).
- `triton`: the fused Triton kernel (CUDA; CPU tensors only under TRITON_INTERPRET=1).
- `original`: the original MuSc's per-image cdist, for speed comparisons only.

All but `original` fill band tables through `bands.score_bands`, so they share the planner and
the finishing step; each is tested against the same float64 oracle.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable

import torch

from musc_edge.errors import UsageError
from musc_edge.msm.bands import FillBand, score_bands

# scorer(z, frac, budget_bytes, dtype, num_queries) -> (num_queries, L) patch scores
Scorer = Callable[[torch.Tensor, float, int, torch.dtype, int], torch.Tensor]
Prepare = Callable[[torch.Tensor, torch.dtype, int], tuple[FillBand, int]]

BACKENDS: dict[str, Scorer] = {}
DEFAULT_BACKEND = "op"


class BackendError(UsageError):
    """An MSM backend that is unknown or cannot run here."""


def register_backend(name: str) -> Callable[[Scorer], Scorer]:
    """Decorator adding a scorer to the selector under `name`."""

    def add(scorer: Scorer) -> Scorer:
        BACKENDS[name] = scorer
        return scorer

    return add


def band_backend(module: str) -> Scorer:
    """A scorer from a module's `prepare(z, dtype, budget) -> (fill, scratch_bytes)`, imported
    when first used so that Triton is only needed by the backend that uses it."""

    def scorer(z: torch.Tensor, frac: float, budget: int, dtype: torch.dtype, queries: int):
        try:
            prepare: Prepare = importlib.import_module(module).prepare
        except ImportError as error:
            raise BackendError(f"MSM backend {module} cannot run here: {error}") from None
        fill, scratch = prepare(z, dtype, budget)
        return score_bands(z, frac, budget, fill, scratch, queries)

    return scorer


@register_backend("op")
def _op(z: torch.Tensor, frac: float, budget: int, dtype: torch.dtype, queries: int):
    from musc_edge.msm import op  # noqa: F401  (registers torch.ops.musc_edge.msm)

    return torch.ops.musc_edge.msm(z, frac, budget, dtype, queries)


@register_backend("original")
def _original(z: torch.Tensor, frac: float, budget: int, dtype: torch.dtype, queries: int):
    from musc_edge.msm.original import original_msm

    return original_msm(z, frac, queries)


register_backend("torch")(band_backend("musc_edge.msm.torch_blocks"))
register_backend("tiles")(band_backend("musc_edge.msm.tiles"))
register_backend("triton")(band_backend("musc_edge.msm.triton_kernel"))


def warn_cpu_fp16(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether fp16 was asked for on a CPU, where MSM computes it in fp32; warns the caller's
    caller (there is no fast fp16 matmul on x86)."""
    if dtype != torch.float16 or device.type != "cpu":
        return False
    warnings.warn(
        "fp16 MSM on CPU computes in fp32 (no fast fp16 matmul on x86); bf16 is the fast mode",
        stacklevel=3,
    )
    return True


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise BackendError(f"unknown MSM backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def mutual_scores(
    z: torch.Tensor,
    frac: float = 0.3,
    budget_bytes: int = 256 * 2**20,
    dtype: torch.dtype = torch.float32,
    backend: str = DEFAULT_BACKEND,
    num_queries: int | None = None,
) -> torch.Tensor:
    """(N, L, C) unit vectors -> (num_queries, L) MSM patch scores (all N by default).

    Patch p of query image i scores the mean over the K = max(1, floor(frac (N - 1))) closest
    other images j of `min_q |z_ip - z_jq|`; images after the first `num_queries` vote but
    are not scored.
    """
    if backend in ("op", "tiles"):
        warn_cpu_fp16(dtype, z.device)
    queries = z.shape[0] if num_queries is None else num_queries
    return BACKENDS[check_backend(backend)](z, frac, budget_bytes, dtype, queries)
