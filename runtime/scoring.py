"""Features in, answers out: a whole batch scored mutually, or one image against a window.

Batch mode is MuSc as the paper runs it. Rolling mode answers each image on arrival against
the last `window` images, which MuSc takes as references (they vote, they are not scored
again); until the window holds a few images there is nothing to compare with, so the first
images are held and scored together as one small batch (at the latest after `--max-wait`).
In batch mode a partial batch too small to judge on its own (the tail of a run, a `--max-wait`
batch of fewer than RELIABLE_BATCH parts) is scored with the previous batch's images as
references, so a batch of one part is still compared with others.
Both go through `MuSc` itself; every answer says how many images it was compared with.

With a calibration the score an image is judged by is its distance to the known-good parts
(docs/verdicts.md), and by default that is all that is computed: each part alone, pooled and
measured against the bank (`score_known_good`), with no batch or window to wait for, no mutual
scoring, RsCIN or consistency guard whose results would decide nothing. With `--mutual` the
known-good parts vote in MuSc's batch and window scores as well. Thresholds and labels are the
line's judge's business (`verdicts.py`), not this module's.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from musc_edge.consistency import repeated_in_batch
from musc_edge.musc import RELIABLE_BATCH, Hooks, MuSc, MuScResult, References
from musc_edge.profile import Profile
from musc_edge.region import Region
from musc_edge.runtime.camera import Arrival
from musc_edge.runtime.known_good import KnownGood, judges_alone
from musc_edge.visualize import normalise_maps


@dataclass
class Item:
    """An image ready to be scored: its features extracted here, or (a station of a plant's
    scoring service, `runtime/remote.py`) its pixels resized for the service."""

    arrival: Arrival
    tokens: list[torch.Tensor] | None  # (L, C) per layer; None: scored remotely
    embedding: torch.Tensor | None  # (D,); None: scored remotely
    preview: np.ndarray  # BGR, for the overlay
    shape: tuple[int, int]  # the original image's (H, W), for the mask
    features_ms: float
    region: Region | None = None  # the box of the image these features are of; None: all
    pixels: np.ndarray | None = None  # at the backbone's size, 8-bit BGR, for the service


@dataclass
class Answer:
    """One image's scores and maps; the line's judge adds the threshold and the label."""

    item: Item
    score: float  # what the verdict is on, in patch-distance units (docs/verdicts.md)
    raw_score: float | None  # max of the mutual patch map; None: not scored mutually
    reference_score: float | None  # max distance to the known-good parts (calibrated)
    patch_map: torch.Tensor  # (h, h) the map the score comes from
    heat: np.ndarray  # (h, h) in [0, 1], normalised per --map-norm
    repeated: bool = False  # the consistency guard flagged a defect repeating across parts
    warning: str | None = None
    sets: list[torch.Tensor] | None = None  # pooled (L, C) per set, for the window and refresh
    compared: int = 0  # other images (batch and references) its mutual score comes from


Part = list[Item]  # one image's items, one per inspection item, in the line's order
PartAnswers = list["Answer"]  # their answers, in the same order
T = TypeVar("T")


def per_part(per_inspection: Sequence[Sequence[T]]) -> list[list[T]]:
    """Each inspection's answers or verdicts (same parts, same order) regrouped per part."""
    return [list(values) for values in zip(*per_inspection, strict=True)]


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


def answers_of(
    items: list[Item],
    sets: list[torch.Tensor],
    result: MuScResult,
    heat: np.ndarray,
    warning: str | None,
    compared: int,
) -> list[Answer]:
    """Answers from a MuSc result: the bank's score and map when there is a bank, else MSM's
    (RsCIN-smoothed) score and map."""
    scores, maps, bank = result.verdict_scores, result.verdict_maps, result.bank_scores
    return [
        Answer(
            item,
            float(scores[i]),
            float(result.raw_scores[i]),
            None if bank is None else float(bank[i]),
            maps[i],
            heat[i],
            warning=warning,
            sets=[z[i] for z in sets],
            compared=compared,
        )
        for i, item in enumerate(items)
    ]


# a calibrated part's heat on the calibration's own scale: 0 at distance 0, 1 at this many
# times the threshold, so the same colour means the same distance on every part
HEAT_SPAN = 1.5


def calibrated_heat(maps: torch.Tensor, threshold: float, map_norm: str) -> np.ndarray:
    """(N, h, w) bank maps -> heat in [0, 1]: per image (`image`), else on the calibration's
    scale (a part scored alone has no batch to be scaled with)."""
    values = maps.float().cpu().numpy()
    if map_norm == "image":
        return normalise_maps(values, map_norm)
    return np.clip(values / (HEAT_SPAN * threshold), 0.0, 1.0)


def known_good_maps(
    tokens: list[torch.Tensor], musc: MuSc, known_good: KnownGood, profile: Profile
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(N, L, C) tokens per layer -> their pooled sets (LNAMD, the package's blocks) and
    (N, rows, columns) maps of each patch's distance to the nearest known-good patch,
    averaged over the sets: all a part judged alone needs."""
    with profile.stage("lnamd"):
        sets = musc.pool(tokens)
    with profile.stage("bank"):
        maps = musc.bank_maps(sets, known_good.references())
    return sets, maps


def score_known_good(
    items: list[Item], musc: MuSc, map_norm: str, known_good: KnownGood, profile: Profile
) -> list[Answer]:
    """Each item judged by its known-good parts alone (`known_good_maps`); the score is the
    map's largest distance. An item's answer depends on nothing else in the call, so a part
    is answered as soon as its features are ready, and a batch scored here equals its parts
    scored one by one."""
    sets, maps = known_good_maps(stack_items(items)[0], musc, known_good, profile)
    with profile.stage("maps"):
        heat = calibrated_heat(maps, known_good.calibration.threshold, map_norm)
    scores = maps.flatten(1).amax(dim=1)
    return [
        Answer(
            item,
            float(scores[i]),
            None,
            float(scores[i]),
            maps[i],
            heat[i],
            sets=[z[i] for z in sets],
            compared=len(known_good),
        )
        for i, item in enumerate(items)
    ]


def score_against(
    items: list[Item],
    sets: list[torch.Tensor],
    embeddings: torch.Tensor,
    musc: MuSc,
    map_norm: str,
    known_good: KnownGood | None,
    window: Window | None,
    profile: Profile,
) -> list[Answer]:
    """MuSc on pooled items, with the window's images (if any) and the known-good parts (if
    any) as references; the heatmaps are scaled together with the window's maps."""
    references, maps = window.references() if window is not None else (None, None)
    bank = known_good.references() if known_good else None
    hooks = Hooks(stage=profile.stage)
    result, warning = scored_quietly(
        lambda: musc.score_pooled(sets, embeddings, references, bank, hooks)
    )
    with profile.stage("maps"):
        verdict_maps = result.verdict_maps
        if maps is not None:
            verdict_maps = torch.cat([maps, verdict_maps])
        heat = normalise_maps(verdict_maps.cpu().numpy(), map_norm)[-len(items) :]
    compared = len(items) - 1 + (0 if maps is None else len(maps))
    return answers_of(items, sets, result, heat, warning, compared)


def score_batch(
    items: list[Item],
    musc: MuSc,
    map_norm: str,
    known_good: KnownGood | None = None,
    recent: Window | None = None,
    profile: Profile | None = None,
) -> list[Answer]:
    """Score the items mutually with MuSc (and against the known-good parts, if any).

    With `recent`, a batch too small to be judged on its own (fewer than RELIABLE_BATCH) is
    also compared with the window's images (references), and every batch then joins the
    window. Larger partial batches are scored on their own, as MuSc does: on a stream of
    grouped defects the previous batch would lend them its defects as look-alikes (measured
    in docs/runtime.md). Known-good parts that judge alone (`judges_alone`) score
    each item by itself instead. Stages are timed into `profile`."""
    profile = profile or Profile()
    if judges_alone(known_good):
        return score_known_good(items, musc, map_norm, known_good, profile)
    tokens, embeddings = stack_items(items)
    with profile.stage("lnamd"):
        sets = musc.pool(tokens)
    use_recent = recent is not None and len(recent) > 0 and len(items) < RELIABLE_BATCH
    window = recent if use_recent else None
    answers = score_against(items, sets, embeddings, musc, map_norm, known_good, window, profile)
    with profile.stage("guard"):
        flags = guard_flags(musc, sets)
    for answer, flagged in zip(answers, flags, strict=True):
        answer.repeated = bool(flagged)
        if recent is not None:
            recent.push(answer)
    return answers


def score_after(
    items: list[Item],
    previous: list[Item],
    musc: MuSc,
    map_norm: str,
    known_good: KnownGood | None,
    window_size: int,
    profile: Profile | None = None,
) -> list[Answer]:
    """A batch scored as the line scores it, away from the line (a re-score, a scoring
    service): `previous`, the line's last batch, is scored first to rebuild the window a batch
    too small to be judged alone is compared with (the same window when it was one batch)."""
    window = Window(window_size, musc.precision.dtype)
    if previous and not judges_alone(known_good):  # a part judged alone needs no window
        score_batch(previous, musc, map_norm, known_good, window)
    return score_batch(items, musc, map_norm, known_good, window, profile)


def guard_flags(musc: MuSc, sets: list[torch.Tensor]) -> list[bool]:
    """The zero-shot repeated-defect guard over one batch (musc_edge/consistency.py)."""
    columns = musc.grid_of(sets[0].shape[1])[1]
    return repeated_in_batch(sets, len(musc.r_list), musc.frac, columns).tolist()


class Window:
    """The last `size` answered images as ring buffers; slot order does not matter to MuSc.

    It keeps each image's pooled sets (layers x r of (L, C), in the similarity precision),
    embedding, raw score and patch map.
    """

    def __init__(self, size: int, dtype: torch.dtype) -> None:
        self.size = size
        self.dtype = dtype
        self.count = 0
        self.buffers: list[torch.Tensor] = []

    def __len__(self) -> int:
        return min(self.count, self.size)

    def push(self, answer: Answer) -> None:
        embedding = answer.item.embedding
        values = [
            *(z.to(self.dtype) for z in answer.sets),
            embedding,
            embedding.new_tensor(answer.raw_score),  # on the scoring device, like the rest
            answer.patch_map,
        ]
        if not self.buffers:
            self.buffers = [v.new_zeros((self.size, *v.shape)) for v in values]
        for buffer, value in zip(self.buffers, values, strict=True):
            buffer[self.count % self.size] = value
        self.count += 1

    def references(self) -> tuple[References, torch.Tensor]:
        """The filled slots as MuSc references, plus their patch maps (for the heat scale)."""
        *sets, embeddings, raw, maps = (buffer[: len(self)] for buffer in self.buffers)
        return References(list(sets), embeddings, raw), maps


class RollingScorer:
    """Answers each image against the last `window` images (see the module docstring)."""

    def __init__(
        self, musc: MuSc, window: int, map_norm: str, known_good: KnownGood | None = None
    ) -> None:
        self.musc = musc
        self.window = Window(window, musc.precision.dtype)
        self.warmup = min(RELIABLE_BATCH, window)
        self.map_norm = map_norm
        self.known_good = known_good
        self.waiting: list[Item] = []

    @property
    def waiting_since(self) -> float | None:
        """When the oldest image held for the warm-up was ready (monotonic), or None."""
        return self.waiting[0].arrival.ready_at if self.waiting else None

    def add(self, item: Item, profile: Profile | None = None) -> list[Answer]:
        """The answers this image makes possible: its own, or the warm-up group's."""
        profile = profile or Profile()
        if len(self.window) == 0:
            self.waiting.append(item)
            return self.flush(profile) if len(self.waiting) >= self.warmup else []
        tokens, embeddings = stack_items([item])
        with profile.stage("lnamd"):
            sets = self.musc.pool(tokens)
        (answer,) = score_against(
            [item],
            sets,
            embeddings,
            self.musc,
            self.map_norm,
            self.known_good,
            self.window,
            profile,
        )
        self.window.push(answer)
        return [answer]

    def flush(self, profile: Profile | None = None) -> list[Answer]:
        """Score images still held for warm-up (at the end of a run, or after --max-wait)."""
        if not self.waiting:
            return []
        items, self.waiting = self.waiting, []
        answers = score_batch(items, self.musc, self.map_norm, self.known_good, profile=profile)
        for answer in answers:
            self.window.push(answer)
        return answers
