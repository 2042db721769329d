"""Features in, answers out: a whole batch scored mutually, or one image against a window.

Batch mode is MuSc as the paper runs it. Rolling mode answers each image on arrival against
the last `window` images, which MuSc takes as references (they vote, they are not scored
again); until the window holds a few images there is nothing to compare with, so the first
images are held and scored together as one small batch. Both go through `MuSc` itself.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from musc_edge.musc import RELIABLE_BATCH, MuSc, MuScResult, References
from musc_edge.runtime.camera import Arrival
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


def stack_items(items: list[Item]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The items' tokens as (N, L, C) per layer and their (N, D) embeddings."""
    tokens = [torch.stack(layer) for layer in zip(*(item.tokens for item in items), strict=True)]
    return tokens, torch.stack([item.embedding for item in items])


def scored_quietly(score: Callable[[], MuScResult]) -> tuple[MuScResult, str | None]:
    """Run `score()`; MuSc's small-batch warning travels with the answers, not to stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = score()
    return result, "; ".join(str(w.message) for w in caught) or None


def score_batch(
    items: list[Item], musc: MuSc, threshold: float | None, map_norm: str
) -> list[Answer]:
    """Score the items mutually with MuSc."""
    tokens, embeddings = stack_items(items)
    result, warning = scored_quietly(lambda: musc.score(tokens, embeddings))
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


class Window:
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

    def references(self) -> tuple[References, torch.Tensor, torch.Tensor]:
        """The filled slots as MuSc references, plus their scores and patch maps."""
        *sets, embeddings, raw, scores, maps = (buffer[: len(self)] for buffer in self.buffers)
        return References(list(sets), embeddings, raw), scores, maps


class RollingScorer:
    """Answers each image against the last `window` images (see the module docstring)."""

    def __init__(self, musc: MuSc, window: int, threshold: float | None, map_norm: str) -> None:
        self.musc = musc
        self.window = Window(window, musc.precision.dtype)
        self.warmup = min(RELIABLE_BATCH, window)
        self.threshold = threshold
        self.map_norm = map_norm
        self.waiting: list[Item] = []

    def add(self, item: Item) -> list[Answer]:
        """The answers this image makes possible: its own, or the warm-up group's."""
        if len(self.window) == 0:
            self.waiting.append(item)
            return self.flush() if len(self.waiting) >= self.warmup else []
        tokens, embeddings = stack_items([item])
        sets = self.musc.pool(tokens)
        answer = self._answer(item, sets, embeddings)
        self.window.push([z[0] for z in sets], answer)
        return [answer]

    def flush(self) -> list[Answer]:
        """Score images still held for warm-up (at the end of a run)."""
        if not self.waiting:
            return []
        items, self.waiting = self.waiting, []
        answers = score_batch(items, self.musc, self.threshold, self.map_norm)
        sets = self.musc.pool(stack_items(items)[0])
        for index, answer in enumerate(answers):
            self.window.push([z[index] for z in sets], answer)
        return answers

    def _answer(self, item: Item, sets: list[torch.Tensor], embeddings: torch.Tensor) -> Answer:
        references, scores, maps = self.window.references()
        result, warning = scored_quietly(
            lambda: self.musc.score_pooled(sets, embeddings, references)
        )
        score = float(result.scores[0])
        threshold = pick_threshold(self.threshold, [*scores.tolist(), score])
        heat = normalise_maps(torch.cat([maps, result.patch_maps]).cpu().numpy(), self.map_norm)
        return Answer(
            item,
            score,
            float(result.raw_scores[0]),
            result.patch_maps[0],
            heat[-1],
            threshold,
            pixel_threshold(threshold, torch.cat([references.raw_scores, result.raw_scores])),
            warning,
        )
