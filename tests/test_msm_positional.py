"""Positional MSM (`MuSc(window=W)`, `--window`) against a float64 brute force.

The oracle computes every patch distance with cdist and keeps, for each patch, the minimum
over the grid positions within the window of its own (Chebyshev distance <= W // 2): no
padding, no offsets, no symmetry, none of the kernel's layout.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from musc_edge import MuSc, References
from musc_edge.cli import app
from musc_edge.cli.run_cmd import line_settings
from musc_edge.msm import mutual_scores
from musc_edge.msm import positional as positional_module
from musc_edge.msm.positional import PositionalError, positional_scores
from musc_edge.musc import MuScInputError
from tests.helpers import run_context, torch_run_config, unit_vectors, write_package
from tests.oracle import lnamd_f64, rscin_f64

BF16_UNIT = 2.0**-8
SHAPES = [  # (N, h, C, window): windows narrower than, equal to and wider than the grid
    (2, 3, 8, 3),
    (5, 4, 16, 1),
    (7, 5, 16, 3),
    (9, 6, 8, 5),
    (6, 7, 32, 7),
    (12, 4, 24, 3),
    (10, 5, 8, 9),
]


def positional_f64(
    z: torch.Tensor, window: int, frac: float = 0.3, num_queries: int | None = None
) -> torch.Tensor:
    """(Q, L) positional MSM in float64 by brute force."""
    z = z.double()
    n, num_patches, _ = z.shape
    side = math.isqrt(num_patches)
    queries = n if num_queries is None else num_queries
    if n == 1:
        return torch.zeros(queries, num_patches, dtype=torch.float64)
    keep = max(1, math.floor(frac * (n - 1)))
    rows = torch.arange(num_patches) // side
    cols = torch.arange(num_patches) % side
    near = ((rows[:, None] - rows[None, :]).abs() <= window // 2) & (
        (cols[:, None] - cols[None, :]).abs() <= window // 2
    )
    scores = torch.empty(queries, num_patches, dtype=torch.float64)
    for i in range(queries):
        nearest = [
            torch.cdist(z[i], z[j]).masked_fill(~near, math.inf).amin(dim=1)
            for j in range(n)
            if j != i
        ]
        scores[i] = torch.stack(nearest, dim=1).sort(dim=1).values[:, :keep].mean(dim=1)
    return scores


def rounded(z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The vectors as the half-precision kernel sees them: rounded, no longer unit length."""
    return z.to(dtype).double()


@pytest.mark.parametrize(("n", "side", "dim", "window"), SHAPES)
def test_fp32_matches_the_float64_oracle(n: int, side: int, dim: int, window: int) -> None:
    z = unit_vectors(n, side * side, dim, seed=n + window)
    ours = positional_scores(z, window, 0.3, 256 * 2**20, torch.float32)
    torch.testing.assert_close(ours.double(), positional_f64(z, window), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("n", "side", "dim", "window"), SHAPES)
def test_bf16_is_the_exact_distance_of_rounded_vectors(n, side, dim, window) -> None:
    """The bound of the global bf16 kernel (tests/test_msm.py): exact distances of the rounded
    vectors up to the half output's rounding, within 2u + u/2 of the fp32 scores."""
    z = unit_vectors(n, side * side, dim, seed=n + window)
    ours = positional_scores(z, window, 0.3, 256 * 2**20, torch.bfloat16).double()
    of_rounded = positional_f64(rounded(z, torch.bfloat16), window)
    assert ((ours - of_rounded).abs() <= BF16_UNIT / 2 * of_rounded + 1e-5).all()
    exact = positional_f64(z, window)
    assert ((ours - exact).abs() <= 2 * BF16_UNIT + BF16_UNIT / 2 * exact + 1e-5).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_window_covering_the_grid_is_global_msm(dtype: torch.dtype) -> None:
    """From every position, a window of 2 h - 1 (or more) reaches every patch."""
    z = unit_vectors(11, 25, 48, seed=1)
    atol = 1e-6 if dtype == torch.float32 else 2e-3
    glob = mutual_scores(z, 0.3, 256 * 2**20, dtype)
    for window in (9, 11, 101):
        ours = positional_scores(z, window, 0.3, 256 * 2**20, dtype)
        torch.testing.assert_close(ours, glob, atol=atol, rtol=0)


def test_window_one_compares_the_same_position_only() -> None:
    z = unit_vectors(6, 16, 8, seed=2)
    distances = (z[:, None] - z[None]).norm(dim=-1)  # (i, j, p)
    distances[range(6), range(6)] = math.inf
    expected = distances.sort(dim=1).values[:, :1].mean(dim=1)  # K = floor(0.3 * 5) = 1
    torch.testing.assert_close(positional_scores(z, 1), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_queries", [0, 1, 4, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_images_after_the_queries_vote_but_are_not_scored(num_queries: int, dtype) -> None:
    z = unit_vectors(10, 36, 16, seed=3)
    ours = positional_scores(z, 3, 0.3, 256 * 2**20, dtype, num_queries)
    assert ours.shape == (num_queries, 36)
    # the references still vote: the rows equal those of the whole batch
    whole = positional_scores(z, 3, 0.3, 256 * 2**20, dtype)
    torch.testing.assert_close(ours, whole[:num_queries], atol=2e-6, rtol=0)
    if dtype == torch.float32:
        expected = positional_f64(z, 3, num_queries=num_queries).float()
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def chunk_shapes(monkeypatch) -> list[tuple[int, ...]]:
    """The (positions, query images, images) tables finished while the patch is in place."""
    seen: list[tuple[int, ...]] = []
    finish_chunk = positional_module.finish_chunk

    def spy(grids, table, first_image, keep):
        seen.append(tuple(table.shape))
        return finish_chunk(grids, table, first_image, keep)

    monkeypatch.setattr(positional_module, "finish_chunk", spy)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_queries", [None, 5])
def test_chunks_under_any_budget_give_the_same_scores(monkeypatch, dtype, num_queries) -> None:
    """From one position of one image per chunk to everything at once: the same scores, and
    both the symmetric and the banded kernel cut their work in several shapes."""
    z = unit_vectors(9, 49, 16, seed=4)
    seen = chunk_shapes(monkeypatch)
    reference = positional_scores(z, 5, 0.3, 256 * 2**20, dtype, num_queries)
    for budget in [1, *range(2_000, 300_000, 4_000)]:
        ours = positional_scores(z, 5, 0.3, budget, dtype, num_queries)
        torch.testing.assert_close(ours, reference, atol=2e-6, rtol=0)
    positions = {shape[0] for shape in seen}
    assert 1 in positions and 49 in positions and len(positions) > 3
    if num_queries is None:
        symmetric = {shape[0] for shape in seen if shape[1:] == (9, 9)}
        assert 49 in symmetric and any(1 < p < 49 for p in symmetric)
        assert any(shape[1] == 1 for shape in seen)  # one image per band below that
    else:
        rows = {shape[1] for shape in seen}
        assert 1 in rows and any(1 < count < num_queries for count in rows)


def test_a_patch_unusual_at_its_position_scores_high_only_in_positional_mode() -> None:
    """Every part shows pattern v_p at position p. On part 0, position (1, 1) shows the
    pattern of position (4, 4): normal texture, in the wrong place. Global MSM finds it at
    (4, 4) on the other parts and calls it normal; a 3 x 3 window does not reach (4, 4)."""
    generator = torch.Generator().manual_seed(5)
    side, n, dim = 6, 10, 16
    patterns = torch.nn.functional.normalize(
        torch.randn(side * side, dim, generator=generator), dim=-1
    )
    z = patterns.expand(n, -1, -1) + 0.05 * torch.randn(n, side * side, dim, generator=generator)
    moved, origin = 1 * side + 1, 4 * side + 4
    z[0, moved] = patterns[origin] + 0.05 * torch.randn(dim, generator=generator)
    z = torch.nn.functional.normalize(z, dim=-1)
    normal = torch.ones(n, side * side, dtype=torch.bool)
    normal[0, moved] = False

    glob = mutual_scores(z)
    assert glob[0, moved] < glob[normal].median()  # ordinary texture to global MSM
    for dtype in (torch.float32, torch.bfloat16):
        ours = positional_scores(z, 3, 0.3, 256 * 2**20, dtype)
        assert ours[0, moved] > 2.5 * ours[normal].max()
        assert ours[0].argmax() == moved
    # a window wide enough to reach (4, 4) from (1, 1) finds the pattern again
    assert positional_scores(z, 7)[0, moved] < glob[normal].max()


@pytest.mark.parametrize("window", [0, 2, -3, 4.0, True, "3"])
def test_a_window_that_is_not_an_odd_size_is_refused(window) -> None:
    with pytest.raises(PositionalError, match="window must be an odd integer >= 1"):
        positional_scores(unit_vectors(4, 9, 8), window)
    with pytest.raises(MuScInputError, match="window must be an odd integer >= 1"):
        MuSc(window=window)


def test_a_class_token_left_in_the_set_is_refused() -> None:
    z = unit_vectors(5, 17, 8)  # 16 patches and a class token
    with pytest.raises(PositionalError, match="square grid, got L = 17: a class or register token"):
        positional_scores(z, 3)
    with pytest.raises(ValueError, match="square grid"):
        MuSc(window=3).score_pooled([z], torch.randn(5, 8), None)


def test_num_queries_beyond_the_batch_is_refused() -> None:
    with pytest.raises(PositionalError, match=r"num_queries must be in \[0, 4\]"):
        positional_scores(unit_vectors(4, 9, 8), 3, num_queries=5)


def test_one_image_scores_zero_and_fp16_on_cpu_says_it_runs_fp32() -> None:
    assert positional_scores(unit_vectors(1, 9, 8), 3).abs().max() == 0
    z = unit_vectors(6, 16, 8)
    with pytest.warns(UserWarning, match="fp16 MSM on CPU computes in fp32"):
        ours = positional_scores(z, 3, 0.3, 256 * 2**20, torch.float16)
    torch.testing.assert_close(ours.double(), positional_f64(z, 3), atol=1e-5, rtol=0)


def test_musc_with_a_window_scores_queries_against_references_as_one_batch() -> None:
    """Rolling mode and known-good parts: references vote through positional MSM too."""
    generator = torch.Generator().manual_seed(6)
    tokens = [torch.randn(12, 25, 32, generator=generator) for _ in range(2)]
    embeddings = torch.randn(12, 16, generator=generator)
    musc = MuSc(window=3)
    batch = musc.score(tokens, embeddings)
    sets = musc.pool([layer[4:] for layer in tokens])
    references = References(sets, embeddings[4:], batch.raw_scores[4:])
    queries = musc.score([layer[:4] for layer in tokens], embeddings[:4], references)
    torch.testing.assert_close(queries.patch_maps, batch.patch_maps[:4], atol=1e-6, rtol=0)
    torch.testing.assert_close(queries.scores, batch.scores[:4], atol=1e-6, rtol=0)
    assert not torch.allclose(batch.patch_maps, MuSc().score(tokens, embeddings).patch_maps)


def test_for_package_takes_the_window_and_the_grid(tmp_path) -> None:
    package = write_package(tmp_path / "square")
    assert MuSc.for_package(package, window=5).window == 5
    assert MuSc.for_package(package).window is None
    wide = write_package(tmp_path / "wide", image_size=[56, 84])
    assert MuSc.for_package(wide).grid == (4, 6)
    with pytest.raises(MuScInputError, match="square patch grid"):
        MuSc.for_package(wide, window=3)


def test_musc_with_a_window_on_real_bottle_features(bottle_features) -> None:
    """MuSc end to end (LNAMD, positional MSM, RsCIN) against the float64 transcription, on
    real DINOv2 tokens of 6 good and 6 broken bottles."""
    tokens, embeddings = bottle_features.tokens, bottle_features.embeddings
    result = MuSc(window=5).score(tokens, embeddings)
    sets = [positional_f64(lnamd_f64(layer, r), 5) for layer in tokens for r in (1, 3, 5)]
    patch = torch.stack(sets).mean(dim=0)
    raw = patch.amax(dim=1)
    side = math.isqrt(patch.shape[1])
    torch.testing.assert_close(
        result.patch_maps.double(), patch.view(-1, side, side), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        result.scores.double(), rscin_f64(raw, embeddings, (1, 2, 3)), atol=1e-4, rtol=0
    )
    # the broken bottles (the last six) outscore every good one
    assert result.scores[6:].min() > result.scores[:6].max()
    bf16 = MuSc(window=5, precision="bf16").score(tokens, embeddings)
    assert (bf16.patch_maps - result.patch_maps).abs().max() < 5e-3


def test_bench_msm_times_the_window_and_refuses_an_even_one() -> None:
    runner = CliRunner()
    args = ["bench", "msm", "--n", "6", "--grid", "4", "--dim", "8", "--sets", "1", "--runs", "1"]
    result = runner.invoke(app, [*args, "--window", "3"])
    assert result.exit_code == 0, result.output
    assert "ours (window 3, fp32)" in result.output and "different by design" in result.output
    result = runner.invoke(app, [*args, "--window", "4"])
    assert result.exit_code == 2
    assert "window must be an odd integer >= 1" in result.output


def test_run_takes_the_window_from_a_line_config_and_records_it(tmp_path: Path) -> None:
    """`window:` is a line-config key like every run option; the batch manifests say it."""
    given = run_context(["--window", "3"])
    assert (
        line_settings(given, write_config(tmp_path, {"camera_dir": "c", "model": "m"})).window == 3
    )
    config = torch_run_config(tmp_path, batch_size=6, window=3)
    result = CliRunner().invoke(app, ["run", "--config", str(write_config(tmp_path, config))])
    assert result.exit_code == 0, result.output
    manifests = [json.loads(p.read_text()) for p in (tmp_path / "out").rglob("*.json")]
    recorded = [m["window"] for m in manifests if "msm_precision" in m]
    assert recorded and set(recorded) == {3}


def write_config(folder: Path, config: dict) -> Path:
    path = folder / "line.yaml"
    path.write_text(yaml.safe_dump(config) if config else "")
    return path
