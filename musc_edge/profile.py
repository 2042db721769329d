"""Stage timers that production code keeps and measurement reads.

The line times its own stages (decode, features, LNAMD, the bank, MSM, RsCIN, each sink) with
a `Profile`; the times land in every record's `Timings` and in the run's totals, and the
benchmarks read those same totals instead of timing a pipeline of their own. On a GPU each
stage synchronises first, so asynchronous work is counted in the stage that launched it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch


class Profile:
    """Milliseconds per named stage, summed over every time the stage is entered."""

    def __init__(self, synchronise: bool | None = None) -> None:
        self.ms: dict[str, float] = {}
        self.synchronise = torch.cuda.is_available() if synchronise is None else synchronise

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Add the time spent inside to `name` (also when the block raises)."""
        self._sync()
        started = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - started) * 1000

    def add(self, other: Profile) -> None:
        """Sum another profile's stages into this one (a commit's into the run's)."""
        for name, ms in other.ms.items():
            self.ms[name] = self.ms.get(name, 0.0) + ms

    def rounded(self) -> dict[str, float]:
        return {name: round(ms, 2) for name, ms in self.ms.items()}

    def _sync(self) -> None:
        if self.synchronise:
            torch.cuda.synchronize()
