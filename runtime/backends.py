"""Where a line's parts are scored: on this device, or by a plant's scoring service.

The line (`line.py`) owns the camera loop, the journal, the verdicts and the sinks whatever
scores its parts; a `Backend` supplies the rest: what an image becomes before it is scored
(features from the package's runner here; the resized pixels a service takes), the scheduler
that scores it, the line's inspections (their known-good parts and judges) and what the run's
manifest says of the model. `LocalBackend` is `musc-edge run` on its own; `RemoteBackend`
(`remote.py`) is `run --remote URL --line NAME`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from musc_edge.musc import MuSc
from musc_edge.package import ModelPackage
from musc_edge.parallel import scoring_device, usable_cores
from musc_edge.runtime.inspections import Inspection, inspections_of
from musc_edge.runtime.known_good import KnownGood
from musc_edge.runtime.record import ResultRecord
from musc_edge.runtime.runners import Runner
from musc_edge.runtime.schedulers import SCHEDULERS, Scheduler, scheduler_name
from musc_edge.runtime.settings import LineSettings


def overlap_helps() -> bool:
    """Whether extracting the next images while a batch is scored pays here: with a GPU, or
    with more than one core (measured on two: 14 % less time per part, docs/benchmarks.md)."""
    return torch.cuda.is_available() or usable_cores() > 1


class Backend(ABC):
    """What scores a line's parts; see the module docstring."""

    model_sha256: str  # the package every record names
    model_name: str  # where it is, for messages

    @abstractmethod
    def run_info(self) -> dict[str, Any]:
        """The model's part of the run manifest."""

    @abstractmethod
    def inspections(
        self, settings: LineSettings, history: Callable[[], Iterable[ResultRecord]]
    ) -> list[Inspection]:
        """The line's inspections, their judges rebuilt from the journal's `history()`."""

    @abstractmethod
    def scheduler(self, settings: LineSettings, known_good: list[KnownGood | None]) -> Scheduler:
        """The scheduler of `settings.mode` that scores the prepared items."""

    @abstractmethod
    def prepare(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        """Each image's `scoring.Item` fields for the scheduler (decoded BGR in)."""


class LocalBackend(Backend):
    """The package's runner extracts features on arrival; MuSc scores them here."""

    def __init__(self, package: ModelPackage, runner: Runner, musc: MuSc) -> None:
        self.package, self.runner, self.musc = package, runner, musc
        self.model_sha256 = package.sha256
        self.model_name = str(package.folder)
        self.preprocess = package.preprocessing()
        self.device = scoring_device()

    def run_info(self) -> dict[str, Any]:
        package, musc = self.package, self.musc
        return {
            "model": str(package.folder),
            "model_sha256": package.sha256,
            "backbone": package.backbone,
            "image_size": package.image_size,
            "engine": self.runner.description,
            "msm_precision": musc.precision.value,
            "window": musc.window,  # positional MSM (docs/positional.md), None: global
            "musc": {"r_list": musc.r_list, "frac": musc.frac, "k_list": musc.k_list},
        }

    def inspections(
        self, settings: LineSettings, history: Callable[[], Iterable[ResultRecord]]
    ) -> list[Inspection]:
        return inspections_of(settings, self.package, self.musc.precision.dtype, history)

    def scheduler(self, settings: LineSettings, known_good: list[KnownGood | None]) -> Scheduler:
        overlap = overlap_helps() if settings.overlap is None else settings.overlap
        name = scheduler_name(settings.mode.value, known_good)
        options = {"overlap": overlap} if name == "batch" else {}
        return SCHEDULERS[name](
            self.musc,
            settings.batch_size,
            settings.map_norm.value,
            known_good,
            self.package.max_batch,
            settings.max_wait if settings.watch else None,
            **options,
        )

    def prepare(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        """The backbone's tokens (per layer) and embedding of each image, on the scoring
        device in float32."""
        tokens, embeddings = self.runner(np.stack([self.preprocess(image) for image in images]))
        tokens = [layer.to(self.device, torch.float32) for layer in tokens]
        embeddings = embeddings.to(self.device, torch.float32)
        return [
            {"tokens": [layer[index] for layer in tokens], "embedding": embeddings[index]}
            for index in range(len(images))
        ]
