"""The known-good references of a calibrated line, optionally refreshed as the shift goes on.

Light drifts over a shift and parts vary from lot to lot; with `--refresh-references N` the
line lets up to N recent parts join the calibration's parts as references, and only parts
answered normal by a clear margin (a score at most halfway from the typical known-good part's
to the threshold), so no part near the threshold, and no defect, can teach the line that it
is normal. The newest N are kept; the calibration's own parts always stay, and the threshold
stays the calibration's.

The parts judge alone by default: a part's score is its distance to them and nothing else is
computed (`scoring.score_known_good`). With `mutual` (`--mutual`) they also vote in MuSc's
mutual scores of every batch and window, as before the scorer judged alone.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from musc_edge.calibration import Calibration
from musc_edge.musc import References
from musc_edge.parallel import scoring_device

MARGIN = 0.5  # a joining part scores at most halfway from the typical good part to the threshold


@dataclass
class Joined:
    """A part that joined the references: its pooled sets, embedding and mutual score."""

    file: str
    sets: list[torch.Tensor]
    embedding: torch.Tensor
    raw_score: float  # NaN when the line does not score mutually (RsCIN never reads it then)


def judges_alone(known_good: KnownGood | None) -> bool:
    """Whether these known-good parts judge by themselves (no `--mutual`): each part is then
    scored alone against them (`scoring.score_known_good`)."""
    return known_good is not None and not known_good.mutual


class KnownGood:
    """The calibration's parts plus up to `refresh` recent parts answered clearly normal."""

    def __init__(
        self,
        calibration: Calibration,
        refresh: int = 0,
        dtype: torch.dtype = torch.float32,
        mutual: bool = False,
    ) -> None:
        self.calibration = calibration
        self.mutual = mutual  # also score parts mutually with their batch or window
        self.base = calibration.references(dtype, scoring_device())
        typical = float(calibration.scores.median())
        self.margin = typical + MARGIN * (calibration.threshold - typical)
        self.joined: deque[Joined] = deque(maxlen=max(refresh, 0) or None)
        self.refresh = refresh
        self.total_joined = 0
        self.current = self.base  # rebuilt only when a part joins, not for every answer

    def __len__(self) -> int:
        return len(self.base) + len(self.joined)

    def references(self) -> References:
        return self.current

    def _rebuild(self) -> References:
        extra = References(
            [torch.stack(z) for z in zip(*(j.sets for j in self.joined), strict=True)],
            torch.stack([j.embedding for j in self.joined]),
            torch.tensor([j.raw_score for j in self.joined]),
        )
        return self.base.grow(extra)

    def offer(self, joined: Joined, score: float) -> bool:
        """Let a part join if refreshing is on and it scored at or below the margin."""
        if self.refresh <= 0 or score > self.margin:
            return False
        self.joined.append(joined)
        self.total_joined += 1
        self.current = self._rebuild()
        return True
