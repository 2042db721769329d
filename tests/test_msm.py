"""Every MSM backend against the float64 oracle; the Triton kernel through Triton's interpreter.

Half-precision bounds (docs/ops.md): the kernels compute exact distances between the vectors
rounded to fp16/bf16, so against fp32 each distance moves by at most |a' - a| + |b' - b| <= 2u
(u = 2^-8 bf16, 2^-11 fp16); the CPU/cuBLAS tiles also round their half output relative to
d^2 / 2, at most u / 2 relative in d. A mean of the K smallest distances inherits both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from musc_edge import MuSc, References
from musc_edge.cli.bench_msm_cmd import bench_msm
from musc_edge.lnamd import lnamd as plain_lnamd
from musc_edge.lnamd_op import lnamd as lnamd_op
from musc_edge.msm import BACKENDS, mutual_scores, neighbour_count, tiles
from musc_edge.msm import op as msm_op
from musc_edge.msm.bands import score_bands
from musc_edge.msm.nearest import nearest_distances
from musc_edge.msm.plan import band_rows
from tests.helpers import unit_vectors
from tests.oracle import msm_f64

ROUNDING = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
SMALL_BUDGET = 24_000  # several bands of few images, small tiles: every path of the kernels

SHAPES = [  # (N, L, C): odd grids, N from 1 to 64, C from 8 to 1024
    (1, 9, 8),
    (2, 9, 8),
    (5, 25, 16),
    (13, 49, 64),
    (33, 49, 8),
    (64, 9, 32),
    (7, 25, 1024),
]


def oracle(z: torch.Tensor) -> torch.Tensor:
    """The float64 oracle's MSM, as float32 for comparisons."""
    return msm_f64(z, 0.3).float()


def rounded_msm_f64(z: torch.Tensor, dtype: torch.dtype, frac: float = 0.3) -> torch.Tensor:
    """MSM by brute force in float64 on the vectors rounded to `dtype`: what half modes mean."""
    n, num_patches, dim = z.shape
    if n == 1:
        return torch.zeros(1, num_patches, dtype=torch.float64)
    flat = z.to(dtype).double().reshape(n * num_patches, dim)
    dist = torch.cdist(flat, flat).view(n, num_patches, n, num_patches).amin(dim=3)
    dist[torch.arange(n), :, torch.arange(n)] = float("inf")
    keep = neighbour_count(n, frac)
    return dist.topk(keep, dim=2, largest=False).values.mean(dim=2)


@pytest.mark.parametrize(("n", "side", "dim"), [(1, 1, 8), (2, 3, 8), (5, 5, 16), (64, 3, 24)])
@pytest.mark.parametrize("r_list", [(1, 3, 5), (7,), (3, 1)])
def test_lnamd_op_matches_plain_lnamd(n: int, side: int, dim: int, r_list: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(n)
    tokens = 3 * torch.randn(n, side * side, dim, generator=generator) + 1
    tokens[..., 0] += 300  # a massive-activation channel, as DINOv2 has
    for ours, ref in zip(lnamd_op(tokens, r_list), plain_lnamd(tokens, r_list), strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_lnamd_op_matches_plain_lnamd_on_wide_real_sized_grid() -> None:
    tokens = torch.randn(3, 37 * 37, 1024, generator=torch.Generator().manual_seed(1))
    for ours, ref in zip(lnamd_op(tokens, (1, 3, 5)), plain_lnamd(tokens, (1, 3, 5)), strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("n", "num_patches", "dim"), SHAPES)
@pytest.mark.parametrize("budget_bytes", [256 * 2**20, SMALL_BUDGET])
@pytest.mark.parametrize("backend", ["op", "torch", "tiles", "original"])
def test_every_backend_in_fp32_matches_the_oracle(n, num_patches, dim, budget_bytes, backend):
    z = unit_vectors(n, num_patches, dim, seed=n)
    ours = mutual_scores(z, 0.3, budget_bytes, torch.float32, backend)
    torch.testing.assert_close(ours, oracle(z), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["op", "torch", "tiles", "original"])
@pytest.mark.parametrize("num_queries", [1, 4, 9])
def test_queries_against_references_are_the_batch_rows_of_the_queries(backend, num_queries):
    """References vote exactly as batch members do; they only go unscored."""
    z = unit_vectors(10, 25, 16, seed=num_queries)
    ours = mutual_scores(z, 0.3, SMALL_BUDGET, torch.float32, backend, num_queries)
    assert ours.shape == (num_queries, 25)
    torch.testing.assert_close(ours, oracle(z)[:num_queries], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_tiles_in_bands_of_several_images(dtype: torch.dtype) -> None:
    """Bands of 3 images, key tiles of 2: pairs inside and outside bands, partial tiles."""
    z = unit_vectors(10, 25, 16)
    budget = 3 * 25 * (4 * 10 + 12 * neighbour_count(10, 0.3))
    ours = score_bands(z, 0.3, budget, tiles.tile_filler(z, dtype, key_tile=2), 0, len(z))
    if dtype == torch.float32:
        torch.testing.assert_close(ours, oracle(z), atol=1e-5, rtol=0)
    else:
        rounded = rounded_msm_f64(z, dtype)
        assert ((ours.double() - rounded).abs() <= ROUNDING[dtype] / 2 * rounded + 1e-5).all()


@pytest.mark.parametrize(("n", "num_patches", "dim"), SHAPES)
def test_msm_op_bf16_is_exact_distance_of_rounded_vectors(n: int, num_patches: int, dim: int):
    z = unit_vectors(n, num_patches, dim, seed=n)
    ours = mutual_scores(z, 0.3, SMALL_BUDGET, torch.bfloat16).double()
    rounded = rounded_msm_f64(z, torch.bfloat16)
    u = ROUNDING[torch.bfloat16]
    assert ((ours - rounded).abs() <= u / 2 * rounded + 1e-5).all()
    exact = oracle(z).double()
    assert ((ours - exact).abs() <= 2 * u + u / 2 * exact + 1e-5).all()


def test_ops_match_the_oracle_on_real_bottle_tokens(bottle_features) -> None:
    """Real DINOv2 tokens: massive channels, and close matches where sqrt(2 - 2s) is touchy."""
    u = ROUNDING[torch.bfloat16]
    for layer in bottle_features.tokens:
        for ours, z in zip(lnamd_op(layer, (1, 3, 5)), plain_lnamd(layer, (1, 3, 5)), strict=True):
            torch.testing.assert_close(ours, z, atol=1e-5, rtol=0)
            exact = oracle(z)
            fp32 = mutual_scores(z, 0.3, SMALL_BUDGET * 40, torch.float32)
            # fp32 similarities of near-twins (s ~ 1 - 1e-4) lose digits in sqrt(2 - 2s)
            torch.testing.assert_close(fp32, exact, atol=1e-4, rtol=0)
            bf16 = mutual_scores(z, 0.3, SMALL_BUDGET * 40, torch.bfloat16)
            assert ((bf16 - exact).abs() <= 2 * u + u / 2 * exact + 1e-5).all()


def test_msm_op_keeps_copies_at_distance_zero_in_bf16() -> None:
    """Two copies of one image: every patch has an exact twin, score 0 in every precision."""
    z = unit_vectors(1, 25, 384).repeat(2, 1, 1)
    for dtype in (torch.float32, torch.bfloat16):
        assert mutual_scores(z, 0.3, SMALL_BUDGET, dtype).abs().max() < 2e-3


def test_msm_op_fp16_on_cpu_computes_fp32_and_says_so() -> None:
    z = unit_vectors(6, 9, 16)
    with pytest.warns(UserWarning, match="fp16 MSM on CPU computes in fp32"):
        ours = mutual_scores(z, 0.3, SMALL_BUDGET, torch.float16)
    torch.testing.assert_close(ours, oracle(z), atol=1e-5, rtol=0)


def test_band_plan_keeps_scratch_under_the_budget_for_any_batch() -> None:
    budget = 256 * 2**20
    for n, num_patches in [(10, 256), (200, 1369), (1000, 1369), (5000, 256)]:
        keep = neighbour_count(n, 0.3)
        rows = band_rows(n, n, num_patches, keep, budget, scratch_bytes=2**20)
        assert rows * num_patches * (4 * n + 12 * keep) + 2**20 <= budget


@pytest.mark.parametrize("backend", ["op", "torch", "tiles", "original"])
def test_musc_scores_through_every_backend_alike(backend: str) -> None:
    generator = torch.Generator().manual_seed(3)
    tokens = [torch.randn(11, 49, 48, generator=generator) for _ in range(3)]
    embeddings = torch.randn(11, 32, generator=generator)
    ours = MuSc(backend=backend).score(tokens, embeddings)
    default = MuSc().score(tokens, embeddings)
    torch.testing.assert_close(ours.patch_maps, default.patch_maps, atol=1e-5, rtol=0)
    # RsCIN min-max normalises the raw scores, dividing their differences by the spread (~0.1)
    torch.testing.assert_close(ours.scores, default.scores, atol=1e-4, rtol=0)


def test_unknown_backend_is_refused_with_the_choices() -> None:
    assert MuSc().backend == "op" and set(BACKENDS) >= {"op", "torch", "tiles", "triton"}
    with pytest.raises(ValueError, match="unknown MSM backend 'cuda'; choose one of op"):
        MuSc(backend="cuda")


def test_queries_with_references_equal_the_same_images_scored_as_one_batch() -> None:
    """Scoring 4 queries against 8 references gives the batch's maps and scores for them,
    when the references carry the raw scores the batch gave them."""
    generator = torch.Generator().manual_seed(4)
    tokens = [torch.randn(12, 25, 32, generator=generator) for _ in range(2)]
    embeddings = torch.randn(12, 16, generator=generator)
    musc = MuSc()
    batch = musc.score(tokens, embeddings)
    sets = musc.pool([layer[4:] for layer in tokens])
    references = References(sets, embeddings[4:], batch.raw_scores[4:])
    queries = musc.score([layer[:4] for layer in tokens], embeddings[:4], references)
    torch.testing.assert_close(queries.patch_maps, batch.patch_maps[:4], atol=1e-6, rtol=0)
    torch.testing.assert_close(queries.raw_scores, batch.raw_scores[:4], atol=1e-6, rtol=0)
    torch.testing.assert_close(queries.scores, batch.scores[:4], atol=1e-6, rtol=0)


def test_fake_impls_pass_opcheck() -> None:
    """Schema, fake tensors and AOT dispatch with dynamic shapes: what torch.compile/export use."""
    z = unit_vectors(4, 9, 8)
    torch.library.opcheck(torch.ops.musc_edge.msm.default, (z, 0.3, 2**20, torch.float32, 3))
    torch.library.opcheck(
        torch.ops.musc_edge.lnamd.default, (torch.randn(3, 12, 8), [1, 3], [3, 4])
    )


def test_ops_compile_into_one_graph() -> None:
    def pipeline(tokens: torch.Tensor) -> torch.Tensor:
        return sum(mutual_scores(z, 0.3, 2**20, torch.float32) for z in lnamd_op(tokens, (1, 3)))

    tokens = torch.randn(5, 9, 8)
    compiled = torch.compile(pipeline, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(tokens), pipeline(tokens))


def test_bench_msm_command_reports_speed_and_difference(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(bench_msm)
    out = tmp_path / "bench.json"
    args = ["--n", "6", "--grid", "3", "--dim", "16", "--sets", "2", "--runs", "1"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "speed-up" in result.output
    report = json.loads(out.read_text())
    assert report["max_abs_diff"] < 1e-5
    assert len(report["ours_seconds"]) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none present")
@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "cublas-tiles"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_kernels_match_the_oracle(monkeypatch, use_triton: bool, dtype: torch.dtype) -> None:
    if use_triton and msm_op.triton_module() is None:
        pytest.skip("Triton is not installed")
    if not use_triton:
        monkeypatch.setattr(msm_op, "triton_module", lambda: None)
    for n, num_patches, dim in SHAPES:
        z = unit_vectors(n, num_patches, dim, seed=n)
        for budget in (256 * 2**20, SMALL_BUDGET):
            ours = mutual_scores(z.cuda(), 0.3, budget, dtype).cpu().double()
            if dtype == torch.float32:
                torch.testing.assert_close(ours.float(), oracle(z), atol=1e-5, rtol=0)
                continue
            rounded = rounded_msm_f64(z, dtype)
            output_rounding = 0 if use_triton else ROUNDING[dtype] / 2
            assert ((ours - rounded).abs() <= output_rounding * rounded + 1e-5).all()
    tokens = torch.randn(4, 25, 64)
    for ours, ref in zip(
        lnamd_op(tokens.cuda(), (1, 3, 5)), plain_lnamd(tokens, (1, 3, 5)), strict=True
    ):
        torch.testing.assert_close(ours.cpu(), ref, atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none present")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_nearest_known_good_patches_match_the_cpu(dtype: torch.dtype) -> None:
    """A calibrated part judged alone on the GPU (the bank there, as `KnownGood` puts it):
    the CPU's fp32 distances, within the precision's rounding of the cosine."""
    queries, bank = unit_vectors(3, 256, 384, seed=1), unit_vectors(20, 256, 384, seed=2)
    exact = nearest_distances(queries, bank)
    ours = nearest_distances(queries.cuda(), bank.cuda(), dtype).cpu()
    # d = sqrt(2 - 2 cos): a cosine rounded by eps moves d by at most sqrt(2 eps)
    eps = torch.finfo(dtype).eps
    assert (ours - exact).abs().max() <= (2 * eps) ** 0.5 + 1e-5


def test_triton_kernel_in_interpreter() -> None:
    """Runs the tests below in a child pytest with TRITON_INTERPRET=1 set before any import,
    so the interpreter never leaks into this process's other tests."""
    pytest.importorskip("triton", reason="Triton is not installed")
    if INTERPRETED:
        pytest.skip("already inside the interpreter run")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            __file__,
            "-k",
            "interpreted",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout


@pytest.mark.skipif(not INTERPRETED, reason="run by test_triton_kernel_in_interpreter")
@pytest.mark.parametrize(
    ("n", "num_patches", "dim", "budget_bytes"),
    [(2, 9, 8, 2**20), (5, 25, 16, 2**20), (6, 49, 40, 9_000), (3, 81, 70, 2**20)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_interpreted_triton_msm_matches_the_oracle(n, num_patches, dim, budget_bytes, dtype):
    from musc_edge.msm.triton_kernel import fill_band_triton  # decorated under the interpreter

    z = unit_vectors(n, num_patches, dim, seed=n)
    fill = partial(fill_band_triton, z.to(dtype))
    ours = score_bands(z, 0.3, budget_bytes, fill, 0, len(z))
    if dtype == torch.float32:
        torch.testing.assert_close(ours, oracle(z), atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(ours.double(), rounded_msm_f64(z, dtype), atol=1e-5, rtol=0)
