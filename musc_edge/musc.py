"""The MuSc scorer: LNAMD -> MSM -> maps -> RsCIN, the one place every caller scores through.

Two ways to score: a batch of unlabeled images against each other (`score`), and query images
against references that vote but receive no score (`References`): a rolling window of recent
parts, or a bank of known-good parts from a calibration. Both run the same LNAMD, the same MSM
backend and the same RsCIN (docs/design.md). A known-good bank also gives each query patch its
distance to the nearest known-good patch (`MuScResult.bank_maps`), the score a calibrated line
judges by (docs/verdicts.md).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from musc_edge import lnamd, lnamd_op
from musc_edge.errors import MuscEdgeError
from musc_edge.lnamd import Grid, grid_shape
from musc_edge.msm import DEFAULT_BACKEND, mutual_scores
from musc_edge.msm.backends import check_backend
from musc_edge.msm.nearest import nearest_distances
from musc_edge.msm.positional import is_window, positional_scores
from musc_edge.precision import Precision, parse_precision
from musc_edge.rscin import rscin

if TYPE_CHECKING:
    from musc_edge.package import ModelPackage

# Below this many images (queries and references together) mutual scores are defined but
# unreliable, and a median / MAD of so few scores says nothing either.
RELIABLE_BATCH = 5
Progress = Callable[[int, int], None]
# stage(name) -> a context manager around that stage ("lnamd", "bank", "msm", "rscin"): the hook the
# benchmark times the stages with
StageHook = Callable[[str], AbstractContextManager]
POOLING = {"op": lnamd_op.lnamd, "plain": lnamd.lnamd}
Tensor = torch.Tensor
Sets = Sequence[torch.Tensor]  # one (N, L, C) unit-vector set per (layer, r)


class MuScInputError(MuscEdgeError, ValueError):
    """Tokens or embeddings that MuSc cannot score; the message says what to fix."""


@dataclass
class MuScResult:
    """Scores of the scored images: per-patch maps, raw image scores and RsCIN scores."""

    patch_maps: torch.Tensor  # (N, rows, columns) patch distances
    raw_scores: torch.Tensor  # (N,) max of each patch map
    scores: torch.Tensor  # (N,) after RsCIN, in patch-distance units
    bank_maps: torch.Tensor | None = None  # (N, rows, columns) distances to the known-good bank

    @property
    def bank_scores(self) -> torch.Tensor | None:
        """(N,) max of each bank map: how far the image's worst patch is from every good part."""
        return None if self.bank_maps is None else self.bank_maps.flatten(1).amax(dim=1)

    @property
    def verdict_maps(self) -> torch.Tensor:
        """The maps a verdict rests on: the bank's when there is one, else the mutual ones."""
        return self.patch_maps if self.bank_maps is None else self.bank_maps

    @property
    def verdict_scores(self) -> torch.Tensor:
        """The image scores a verdict rests on: the bank's, else RsCIN's (docs/verdicts.md)."""
        return self.scores if self.bank_maps is None else self.bank_scores

    def pixel_maps(self, size: int | tuple[int, int], mutual: bool = False) -> torch.Tensor:
        """(N, H, W) verdict maps (or the mutual ones) upsampled bilinearly (align_corners=True)
        to `size`."""
        chosen = self.patch_maps if mutual else self.verdict_maps
        maps = F.interpolate(chosen.unsqueeze(1), size=size, mode="bilinear", align_corners=True)
        return maps.squeeze(1)


@dataclass
class References:
    """Images that vote in every query's scores but receive none: pooled sets, embeddings and
    the raw scores they were given when they were scored themselves (RsCIN needs those)."""

    sets: list[torch.Tensor]  # one (R, L, C) unit-vector set per (layer, r)
    embeddings: torch.Tensor  # (R, D)
    raw_scores: torch.Tensor  # (R,)
    aligned_spread: AlignedSpread | None = None  # fixtured parts: each position's normal spread
    # the patches distances are measured to, (M, C) per set, when they are not all of the
    # voters' own (a calibration's coreset of many more parts, musc_edge/coreset.py)
    bank: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def patches(self, index: int) -> torch.Tensor:
        """(M, C) known-good patches of set `index`: the bank's, else the voters' own."""
        if self.bank is not None:
            return self.bank[index]
        return self.sets[index].reshape(-1, self.sets[index].shape[-1])

    def join(self, other: References | None) -> References:
        """These references and `other`'s as one set of voters (our positional spread).

        The voters are all MSM needs; a separate bank is left out, since copying up to a
        coreset's thousands of patches per set for every scored batch would buy nothing (the bank
        maps are measured against the known-good references alone). `grow` keeps it."""
        if other is None or not len(other):
            return self
        if not len(self):
            return replace(
                other, aligned_spread=self.aligned_spread or other.aligned_spread, bank=None
            )
        return References(
            [torch.cat([a, b.to(a.dtype)]) for a, b in zip(self.sets, other.sets, strict=True)],
            torch.cat([self.embeddings, other.embeddings.to(self.embeddings)]),
            torch.cat([self.raw_scores, other.raw_scores.to(self.raw_scores)]),
            self.aligned_spread or other.aligned_spread,
        )

    def grow(self, other: References) -> References:
        """These known-good references with `other`'s parts added as voters and, when there is
        a separate bank, to the bank as well (a part joining with --refresh-references)."""
        grown = self.join(other)
        if self.bank is None:
            return grown
        bank = [
            torch.cat([patches, other.patches(i).to(patches)])
            for i, patches in enumerate(self.bank)
        ]
        return replace(grown, bank=bank)


@dataclass
class AlignedSpread:
    """Fixtured parts: how far each position's patches of a good part usually are from the
    nearest known-good patch (centre and spread per pooled set). A deviation in these units
    rises where a position looks unlike itself on good parts, even where the patch resembles
    a good patch elsewhere: the same defect at the same place on many parts.

    The verdict map is the larger of the plain bank distance and this deviation, each over
    its own threshold, so the score is in multiples of the threshold (1.0 = the threshold)."""

    centre: list[torch.Tensor]  # (L,) per pooled set
    spread: list[torch.Tensor]  # (L,) per pooled set, > 0
    distance_threshold: float  # of the plain bank distance
    deviation_threshold: float  # of the positional deviation

    def standardise(self, distances: torch.Tensor, index: int) -> torch.Tensor:
        """(Q, L) bank distances of set `index` -> deviations in units of its spread."""
        centre, spread = self.centre[index].to(distances), self.spread[index].to(distances)
        return (distances - centre) / spread

    def combine(self, distances: torch.Tensor, deviations: torch.Tensor) -> torch.Tensor:
        """Set-averaged distances and deviations -> the verdict map, in threshold units."""
        return torch.maximum(
            distances / self.distance_threshold, deviations / self.deviation_threshold
        )


def check_inputs(
    tokens: Sequence[torch.Tensor], embeddings: torch.Tensor, grid: Grid | None = None
) -> int:
    """Raise MuScInputError on anything MuSc cannot score; return the batch size."""
    if len(tokens) == 0:
        raise MuScInputError("tokens is empty: pass a list with one (N, L, C) tensor per layer")
    sizes = set()
    for index, layer in enumerate(tokens):
        if layer.ndim != 3 or not layer.is_floating_point():
            raise MuScInputError(
                f"tokens[{index}] has shape {tuple(layer.shape)} and dtype {layer.dtype}; "
                "expected a float tensor (N, L, C)"
            )
        try:
            grid_shape(layer.shape[1], grid)
        except ValueError as error:
            raise MuScInputError(f"tokens[{index}]: {error}") from None
        if not torch.isfinite(layer).all():
            raise MuScInputError(f"tokens[{index}] holds NaN or inf; check the backbone output")
        sizes.add((layer.shape[0], layer.shape[1]))
    if len(sizes) != 1:
        raise MuScInputError(
            f"layers disagree on (N, L): {sorted(sizes)}; every layer must hold the same images "
            "on the same patch grid"
        )
    ((num_images, _),) = sizes
    if num_images == 0:
        raise MuScInputError("the batch holds no images")
    if embeddings.ndim != 2 or embeddings.shape[0] != num_images:
        raise MuScInputError(
            f"embeddings has shape {tuple(embeddings.shape)}; expected ({num_images}, D) "
            "to match the tokens"
        )
    if not torch.isfinite(embeddings).all():
        raise MuScInputError("embeddings hold NaN or inf; check the backbone output")
    return num_images


def check_references(sets: Sequence[torch.Tensor], references: References) -> None:
    """References must hold as many sets as the queries, on the same grid and width."""
    if len(references.sets) != len(sets):
        raise MuScInputError(
            f"references hold {len(references.sets)} pooled sets, the queries {len(sets)}; "
            "they must come from the same layers and r_list"
        )
    for query, ref in zip(sets, references.sets, strict=True):
        if ref.shape[1:] != query.shape[1:] or ref.shape[0] != len(references):
            raise MuScInputError(
                f"references of shape {tuple(ref.shape)} do not fit queries of shape "
                f"{tuple(query.shape)} with {len(references)} reference embeddings"
            )


def unreliable_warning(num_images: int) -> None:
    if num_images < RELIABLE_BATCH:
        warnings.warn(
            f"MuSc scores {num_images} image(s) against each other; with fewer than "
            f"{RELIABLE_BATCH} the scores are defined but unreliable"
            + (" (a single image always scores 0)" if num_images == 1 else ""),
            stacklevel=3,
        )


def no_stage(name: str) -> AbstractContextManager:
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Hooks:
    """Callbacks of a scoring call: `progress(done, total)` after each (layer, r) set, the
    slow part; `stage(name)` around "lnamd", "bank", "msm" and "rscin" (a `Profile.stage`:
    the line's and the benchmarks' timers, musc_edge/profile.py)."""

    progress: Progress | None = None
    stage: StageHook = no_stage


class MuSc:
    """Zero-shot anomaly scoring of unlabeled images by mutual patch scoring.

    >>> result = MuSc().score(tokens, embeddings)  # tokens: list of (N, L, C), one per layer
    >>> result.scores, result.patch_maps
    """

    def __init__(
        self,
        r_list: Sequence[int] = (1, 3, 5),
        frac: float = 0.3,
        k_list: Sequence[int] = (1, 2, 3),
        precision: Precision | str = "fp32",
        memory_budget_mb: int = 256,
        backend: str = DEFAULT_BACKEND,
        pooling: str = "op",
        window: int | None = None,
        grid: Grid | None = None,
    ) -> None:
        if not r_list or any(r < 1 or r % 2 == 0 for r in r_list):
            raise MuScInputError(f"r_list must hold odd sizes >= 1, got {tuple(r_list)}")
        if not 0 < frac <= 1:
            raise MuScInputError(f"frac must be in (0, 1], got {frac}")
        if not k_list or any(k < 1 for k in k_list):
            raise MuScInputError(f"k_list must hold sizes >= 1, got {tuple(k_list)}")
        if pooling not in POOLING:
            raise MuScInputError(f"pooling must be one of {', '.join(POOLING)}, got {pooling!r}")
        if window is not None and not is_window(window):
            raise MuScInputError(
                f"window must be an odd integer >= 1 (3, 5, 7; None: global MSM), got {window!r}"
            )
        if window is not None and grid is not None and grid[0] != grid[1]:
            raise MuScInputError(
                f"positional MSM (a window) needs a square patch grid, this input has {grid[0]} "
                f"x {grid[1]} patches; export a square package or score without a window"
            )
        self.r_list = tuple(r_list)
        self.frac = frac
        self.k_list = tuple(k_list)
        self.precision = parse_precision(precision)
        self.budget_bytes = memory_budget_mb * 2**20
        self.backend = check_backend(backend)
        self.pooling = pooling
        # positional MSM (fixtured parts): only the window x window positions around a
        # patch's own are compared (docs/positional.md); None: every patch, MuSc's MSM
        self.window = window
        # (rows, columns) of a non-square input's patch grid; None: square, from the tokens
        self.grid = None if grid is None else (int(grid[0]), int(grid[1]))

    @classmethod
    def for_package(
        cls, package: ModelPackage, precision: Precision | str | None = None, **options: Any
    ) -> MuSc:
        """MuSc with a model package's `musc` settings on its patch grid; `precision`
        overrides the package's; `options` go to the constructor (backend, window, ...)."""
        settings = package.musc
        chosen = precision or settings.get("precision", Precision.fp32)
        return cls(
            settings["r_list"],
            settings["frac"],
            settings["k_list"],
            chosen,
            grid=package.grid,
            **options,
        )

    def grid_of(self, num_patches: int) -> Grid:
        """(rows, columns) of the patch grid that `num_patches` tokens lie on."""
        return grid_shape(num_patches, self.grid)

    def pool(self, tokens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """LNAMD of (N, L, C) tokens per layer: one (N, L, C) unit-vector set per (layer, r)."""
        pool = POOLING[self.pooling]
        return [z for layer in tokens for z in pool(layer, self.r_list, self.grid)]

    def patch_scores(
        self,
        sets: Sequence[torch.Tensor],
        num_queries: int | None = None,
        progress: Progress | None = None,
    ) -> torch.Tensor:
        """(Q, L) MSM patch scores of the first Q images, averaged over every pooled set;
        with a window, positional MSM (its own kernel, whatever the backend)."""
        total = None
        dtype = self.precision.dtype
        for index, z in enumerate(sets):
            if self.window is None:
                scores = mutual_scores(
                    z, self.frac, self.budget_bytes, dtype, self.backend, num_queries
                )
            else:
                scores = positional_scores(
                    z, self.window, self.frac, self.budget_bytes, dtype, num_queries
                )
            total = scores if total is None else total + scores
            if progress:
                progress(index + 1, len(sets))
        return total / len(sets)

    def bank_maps(self, sets: Sets, bank: References) -> torch.Tensor:
        """(Q, rows, columns) distance of each query patch to the nearest patch of the bank,
        averaged over the pooled sets as MSM's patch scores are (fixtured parts: see
        `AlignedSpread`)."""
        total = deviation = 0
        for index, z in enumerate(sets):
            patches = bank.patches(index)
            distances = nearest_distances(z, patches, self.precision.dtype, self.budget_bytes)
            total = total + distances
            if bank.aligned_spread is not None:
                deviation = deviation + bank.aligned_spread.standardise(distances, index)
        maps = total / len(sets)
        if bank.aligned_spread is not None:
            maps = bank.aligned_spread.combine(maps, deviation / len(sets))
        return maps.view(-1, *self.grid_of(sets[0].shape[1]))

    @torch.no_grad()
    def score(
        self,
        tokens: Sequence[torch.Tensor],
        embeddings: torch.Tensor,
        references: References | None = None,
        hooks: Hooks = Hooks(),
        known_good: References | None = None,
    ) -> MuScResult:
        """Score N images against each other (and the references, if any; known-good
        references vote too and give the bank maps)."""
        check_inputs(tokens, embeddings, self.grid)
        with hooks.stage("lnamd"):
            sets = self.pool(tokens)
        return self._score_sets(sets, embeddings, references, hooks, known_good)

    @torch.no_grad()
    def score_pooled(
        self,
        sets: Sets,
        embeddings: Tensor,
        references: References | None,
        known_good: References | None = None,
        hooks: Hooks = Hooks(),
    ) -> MuScResult:
        """Score already pooled query images (the line pools each image once, on arrival,
        and keeps its sets for the window)."""
        return self._score_sets(sets, embeddings, references, hooks, known_good)

    def _score_sets(
        self,
        sets: Sets,
        embeddings: Tensor,
        references: References | None,
        hooks: Hooks,
        known_good: References | None = None,
    ) -> MuScResult:
        """MSM, maps and RsCIN of pooled queries; references vote in MSM and RsCIN, unscored."""
        num_queries = embeddings.shape[0]
        bank = None
        if known_good is not None and len(known_good):
            check_references(sets, known_good)
            with hooks.stage("bank"):
                bank = self.bank_maps(sets, known_good)
            references = known_good if references is None else references.join(known_good)
        if references is not None and len(references):
            check_references(sets, references)
            sets = [
                torch.cat([q.to(r.dtype), r]) for q, r in zip(sets, references.sets, strict=True)
            ]
        num_images = sets[0].shape[0]
        unreliable_warning(num_images)
        with hooks.stage("msm"):
            patch = self.patch_scores(sets, num_queries, hooks.progress)
        with hooks.stage("rscin"):
            raw = patch.amax(dim=1)
            all_raw, all_embeddings = raw, embeddings.to(raw.device)
            if num_images > num_queries:
                all_raw = torch.cat([raw, references.raw_scores.to(raw)])
                all_embeddings = torch.cat([all_embeddings, references.embeddings.to(raw.device)])
            scores = rscin(all_raw, all_embeddings, self.k_list)[:num_queries]
        maps = patch.view(num_queries, *self.grid_of(patch.shape[1]))
        return MuScResult(maps, raw, scores, bank)
