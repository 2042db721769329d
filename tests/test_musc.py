"""The MuSc engine against the float64 oracle and brute force."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from musc_edge import MuSc, MuScInputError
from musc_edge.lnamd import lnamd
from musc_edge.msm import mutual_scores
from musc_edge.rscin import rscin
from tests.oracle import musc_f64


def random_batch(n: int, layers: int, side: int, dim: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    tokens = [torch.randn(n, side * side, dim, generator=generator) for _ in range(layers)]
    return tokens, torch.randn(n, 32, generator=generator)


def assert_matches_f64(result, tokens, embeddings, atol: float = 1e-4) -> None:
    maps, raw, scores = musc_f64(tokens, embeddings)
    torch.testing.assert_close(result.patch_maps.double(), maps, atol=atol, rtol=0)
    torch.testing.assert_close(result.raw_scores.double(), raw, atol=atol, rtol=0)
    torch.testing.assert_close(result.scores.double(), scores, atol=atol, rtol=0)


@pytest.mark.parametrize(
    ("n", "layers", "side", "dim"),
    [(1, 1, 4, 8), (2, 2, 5, 16), (4, 1, 3, 24), (7, 3, 6, 32), (13, 4, 4, 64), (40, 2, 5, 48)],
)
def test_score_matches_float64_transcription(n, layers, side, dim) -> None:
    tokens, embeddings = random_batch(n, layers, side, dim, seed=n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = MuSc().score(tokens, embeddings)
    assert_matches_f64(result, tokens, embeddings)


def test_score_matches_float64_on_real_bottle_tokens(bottle_features) -> None:
    result = MuSc().score(bottle_features.tokens, bottle_features.embeddings)
    assert_matches_f64(result, bottle_features.tokens, bottle_features.embeddings)
    # the six defective images (second half) outscore the six good ones on these real features
    assert result.scores[6:].min() > result.scores[:6].max()


def test_lnamd_equals_unfold_adaptive_pool_formulation() -> None:
    """The paper's unfold + adaptive_avg_pool1d form computes the same neighbourhood mean."""
    tokens, _ = random_batch(3, 1, 7, 20)
    n, num_patches, dim = tokens[0].shape
    side = math.isqrt(num_patches)
    grid = F.layer_norm(tokens[0].transpose(1, 2).reshape(n, dim, side, side), (dim, side, side))
    for r, ours in zip((1, 3, 5), lnamd(tokens[0], (1, 3, 5)), strict=True):
        patches = F.unfold(grid, kernel_size=r, padding=r // 2)  # (N, C*r*r, L), channel-major
        flat = patches.transpose(1, 2).reshape(n * num_patches, 1, dim * r * r)
        pooled = F.adaptive_avg_pool1d(flat, dim).reshape(n, num_patches, dim)
        torch.testing.assert_close(ours, F.normalize(pooled, dim=-1), atol=1e-6, rtol=0)


def brute_force_msm(z: torch.Tensor, frac: float) -> torch.Tensor:
    n, num_patches, _ = z.shape
    k = max(1, math.floor(frac * (n - 1)))
    scores = torch.empty(n, num_patches)
    for i in range(n):
        for p in range(num_patches):
            nearest = [
                min(float((z[i, p] - z[j, q]).norm()) for q in range(num_patches))
                for j in range(n)
                if j != i
            ]
            scores[i, p] = sum(sorted(nearest)[:k]) / k
    return scores


@pytest.mark.parametrize("budget_bytes", [256 * 2**20, 4096, 1])
def test_msm_equals_brute_force_distance_loop(budget_bytes: int) -> None:
    """Whatever the memory budget (one band or many, big or tiny tiles), the same scores."""
    generator = torch.Generator().manual_seed(3)
    z = F.normalize(torch.randn(9, 9, 12, generator=generator), dim=-1)
    expected = brute_force_msm(z, 0.3)
    torch.testing.assert_close(mutual_scores(z, 0.3, budget_bytes), expected, atol=1e-5, rtol=0)


def test_rscin_with_k1_is_identity_on_raw_scores() -> None:
    generator = torch.Generator().manual_seed(1)
    raw = torch.rand(10, generator=generator) * 5 + 2
    embeddings = torch.randn(10, 16, generator=generator)
    torch.testing.assert_close(rscin(raw, embeddings, [1]), raw)


def test_rscin_commutes_with_an_affine_rescaling() -> None:
    """Why the original's min-max can go: it would change the scale, never the ranking."""
    generator = torch.Generator().manual_seed(2)
    raw = torch.rand(12, generator=generator, dtype=torch.float64)
    embeddings = torch.randn(12, 16, generator=generator)
    rescaled = rscin(3.0 * raw - 0.5, embeddings, [1, 2, 3])
    torch.testing.assert_close(rescaled, 3.0 * rscin(raw, embeddings, [1, 2, 3]) - 0.5)


def test_image_order_does_not_change_results() -> None:
    tokens, embeddings = random_batch(11, 2, 5, 16, seed=5)
    order = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    first = MuSc().score(tokens, embeddings)
    shuffled = MuSc().score([t[order] for t in tokens], embeddings[order])
    torch.testing.assert_close(shuffled.patch_maps, first.patch_maps[order], atol=1e-6, rtol=0)
    torch.testing.assert_close(shuffled.scores, first.scores[order], atol=1e-6, rtol=0)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_small_batches_are_finite_and_warn(n: int) -> None:
    tokens, embeddings = random_batch(n, 2, 4, 16, seed=n)
    with pytest.warns(UserWarning, match="unreliable"):
        result = MuSc().score(tokens, embeddings)
    for tensor in (result.patch_maps, result.raw_scores, result.scores):
        assert torch.isfinite(tensor).all()
    if n == 1:
        assert result.scores.tolist() == [0.0]


def test_pixel_maps_upsample_with_aligned_corners() -> None:
    tokens, embeddings = random_batch(6, 1, 4, 16)
    result = MuSc().score(tokens, embeddings)
    maps = result.pixel_maps(32)
    assert maps.shape == (6, 32, 32)
    torch.testing.assert_close(maps[:, 0, 0], result.patch_maps[:, 0, 0])
    torch.testing.assert_close(maps[:, -1, -1], result.patch_maps[:, -1, -1])


@pytest.mark.parametrize(
    ("tokens", "embeddings", "message"),
    [
        ([torch.randn(5, 15, 8)], torch.randn(5, 4), "do not form a square grid"),
        ([torch.randn(5, 16, 8), torch.randn(4, 16, 8)], torch.randn(5, 4), "disagree on"),
        ([torch.full((5, 16, 8), float("nan"))], torch.randn(5, 4), "NaN or inf"),
        ([torch.randn(5, 16, 8)], torch.randn(4, 4), r"expected \(5, D\)"),
        ([], torch.randn(5, 4), "tokens is empty"),
        ([torch.randn(5, 16)], torch.randn(5, 4), "expected a float tensor"),
        ([torch.randn(5, 16, 8)], torch.full((5, 4), float("inf")), "embeddings hold NaN"),
    ],
)
def test_bad_inputs_raise_one_clear_error(tokens, embeddings, message) -> None:
    with pytest.raises(MuScInputError, match=message):
        MuSc().score(tokens, embeddings)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r_list": (2,)}, "odd sizes"),
        ({"frac": 0.0}, "frac"),
        ({"k_list": ()}, "k_list"),
        ({"precision": "fp8"}, "unknown precision"),
    ],
)
def test_bad_settings_are_refused(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        MuSc(**kwargs)
