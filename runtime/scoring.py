"""Features in, answers out: a whole batch scored mutually, or one image against a window.

Batch mode is MuSc as the paper runs it. Rolling mode answers each image on arrival against
the last `window` images (unlabeled references) with the query-vs-references scorer and RsCIN
over the window; until the window holds a few images there is nothing to compare with, so the
first images are held and scored together as one small batch.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from musc_edge.musc import RELIABLE_BATCH, MuSc
from musc_edge.rscin import rscin
from musc_edge.runtime.camera import Arrival
from musc_edge.runtime.reference import pooled_sets, reference_patch_scores
from musc_edge.runtime.threshold import pick_threshold, pixel_threshold
from musc_edge.visualize import normalise_maps


@dataclass
class Item:
    """An image whose features are extracted, waiting for its score."""

    arrival: Arrival
    tokens: list[torch.Tensor]  # (L, C) per layer
    embedding: torch.Tensor  # (D,)
    preview: np.ndarray  # BGR, for the overlay
    shape: tuple[int, int]  # the original image's (H, W), for the mask
    features_ms: float


@dataclass
class Answer:
    """One image's scores, maps and the threshold it was labelled against."""

    item: Item
    score: float  # RsCIN, [0, 1] within the batch or window
    raw_score: float  # max of the patch map (a patch distance)
    patch_map: torch.Tensor  # (h, h) patch distances
    heat: np.ndarray  # (h, h) in [0, 1], normalised per --map-norm
    threshold: float | None  # on `score`
    mask_threshold: float | None  # the same threshold on patch distances
    warning: str | None = None


def score_batch(
    items: list[Item], musc: MuSc, threshold: float | None, map_norm: str
) -> list[Answer]:
    """Score the items mutually with MuSc; small batches carry the core's warning along."""
    tokens = [torch.stack(layer) for layer in zip(*(item.tokens for item in items), strict=True)]
    embeddings = torch.stack([item.embedding for item in items])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = musc.score(tokens, embeddings)
    warning = "; ".join(str(w.message) for w in caught) or None
    scores = result.scores.tolist()
    chosen = pick_threshold(threshold, scores)
    for_masks = pixel_threshold(chosen, result.raw_scores)
    heat = normalise_maps(result.patch_maps.cpu().numpy(), map_norm)
    return [
        Answer(item, score, raw, patch_map, item_heat, chosen, for_masks, warning)
        for item, score, raw, patch_map, item_heat in zip(
            items, scores, result.raw_scores.tolist(), result.patch_maps, heat, strict=True
        )
    ]


class _Window:
    """The last `size` answered images as ring buffers; slot order does not matter to MuSc.

    It keeps each image's pooled sets (layers x r of (L, C), in the similarity precision),
    embedding, raw score, score and patch map.
    """

    def __init__(self, size: int, dtype: torch.dtype) -> None:
        self.size = size
        self.dtype = dtype
        self.count = 0
        self.buffers: list[torch.Tensor] = []

    def __len__(self) -> int:
        return min(self.count, self.size)

    def push(self, sets: list[torch.Tensor], answer: Answer) -> None:
        embedding = answer.item.embedding
        values = [
            *(z.to(self.dtype) for z in sets),
            embedding,
            embedding.new_tensor(answer.raw_score),  # on the scoring device, like the rest
            embedding.new_tensor(answer.score),
            answer.patch_map,
        ]
        if not self.buffers:
            self.buffers = [v.new_zeros((self.size, *v.shape)) for v in values]
        for buffer, value in zip(self.buffers, values, strict=True):
            buffer[self.count % self.size] = value
        self.count += 1

    def view(self) -> list[torch.Tensor]:
        """The filled slots: pooled sets, then embeddings, raw scores, scores, patch maps."""
        return [buffer[: len(self)] for buffer in self.buffers]


class RollingScorer:
    """Answers each image against the last `window` images (see the module docstring)."""

    def __init__(self, musc: MuSc, window: int, threshold: float | None, map_norm: str) -> None:
        self.musc = musc
        self.window = _Window(window, musc.precision.dtype)
        self.warmup = min(RELIABLE_BATCH, window)
        self.threshold = threshold
        self.map_norm = map_norm
        self.waiting: list[Item] = []

    def add(self, item: Item) -> list[Answer]:
        """The answers this image makes possible: its own, or the warm-up group's."""
        if len(self.window) == 0:
            self.waiting.append(item)
            return self.flush() if len(self.waiting) >= self.warmup else []
        sets = pooled_sets(item.tokens, self.musc.r_list)
        answer = self._answer(item, sets)
        self.window.push(sets, answer)
        return [answer]

    def flush(self) -> list[Answer]:
        """Score images still held for warm-up (at the end of a run)."""
        if not self.waiting:
            return []
        answers = score_batch(self.waiting, self.musc, self.threshold, self.map_norm)
        self.waiting = []
        for answer in answers:
            self.window.push(pooled_sets(answer.item.tokens, self.musc.r_list), answer)
        return answers

    def _answer(self, item: Item, sets: list[torch.Tensor]) -> Answer:
        *references, embeddings, raw, scores, maps = self.window.view()
        musc = self.musc
        patch = reference_patch_scores(
            sets, references, musc.frac, musc.precision.dtype, musc.budget_bytes
        )
        side = math.isqrt(patch.shape[0])
        patch_map = patch.view(side, side)
        all_raw = torch.cat([raw, patch.amax()[None]])
        score = float(
            rscin(all_raw, torch.cat([embeddings, item.embedding[None]]), musc.k_list)[-1]
        )
        threshold = pick_threshold(self.threshold, [*scores.tolist(), score])
        heat = normalise_maps(torch.cat([maps, patch_map[None]]).cpu().numpy(), self.map_norm)
        return Answer(
            item,
            score,
            float(all_raw[-1]),
            patch_map,
            heat[-1],
            threshold,
            pixel_threshold(threshold, all_raw),
        )
