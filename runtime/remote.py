"""A station of a plant's scoring service: `run --camera-dir DIR --remote URL --line NAME`.

The station keeps everything `run` keeps (the camera loop, the journal, the verdicts and
their threshold history, the sinks and their outboxes) and sends each batch to the service
(`service.py`) instead of scoring it: the images resized to the line's backbone size, 8-bit,
plus the previous batch when this one is too small to be judged alone. The service answers with
the scores and maps; the station judges them as `run` does, with the line's calibrated judge as
the service describes it, and commits them.

When the service does not answer (down, restarting, slow past `--remote-timeout`, or changed
to another model), the batch stays in hand, first in line, the station says so (the log,
`/healthz`, the MQTT status: the "scoring" problem) and stops taking files: they wait in the
camera folder, in order, and nothing is recorded for them. It retries with a growing pause;
when the service is back the batches go in their order, each recorded once under its file's
key, whether its first try was lost or not. The line's description is kept in OUT, so a station
that starts while the service is down waits for it instead of failing.
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from musc_edge.errors import UsageError
from musc_edge.files import write_json_atomic
from musc_edge.images import Preprocess
from musc_edge.musc import RELIABLE_BATCH
from musc_edge.profile import Profile
from musc_edge.region import Region
from musc_edge.runtime.backends import Backend
from musc_edge.runtime.inspections import Inspection
from musc_edge.runtime.known_good import KnownGood
from musc_edge.runtime.record import ResultRecord
from musc_edge.runtime.schedulers import BatchScheduler, Scheduler, Scored
from musc_edge.runtime.scoring import Part, PartAnswers, Window
from musc_edge.runtime.settings import LineSettings
from musc_edge.runtime.verdicts import CalibratedJudge, FixedJudge, HistoryJudge, Judge, Verdicts
from musc_edge.runtime.wire import NPZ_TYPE, LineSpec, answer_from_json, encode_batch

SPEC_FILE = "service-line.json"  # the line's description as the service last gave it
RETRY_FIRST, RETRY_MAX = 1.0, 15.0  # seconds between tries while the service does not answer
SLOW_AFTER = 30.0  # seconds a batch may be out before the station says the service is slow


class ServiceUnavailable(Exception):
    """The service did not answer a batch (the message says why); the batch is kept."""


class ServiceClient:
    """HTTP to the scoring service for one line (standard library only: a station needs no
    Ray)."""

    def __init__(self, url: str, line: str, timeout: float) -> None:
        self.url, self.line, self.timeout = url.rstrip("/"), line, timeout

    def spec(self) -> LineSpec:
        """The line's description (UsageError: the service does not serve this line)."""
        return LineSpec.from_json(self._call("GET", f"/lines/{self.line}"))

    def score(
        self, images: list[np.ndarray], previous: list[np.ndarray], window: int, map_norm: str
    ) -> dict[str, Any]:
        path = f"/lines/{self.line}/score?window={window}&map_norm={map_norm}"
        return self._call("POST", path, encode_batch(images, previous))

    def _call(self, method: str, path: str, body: bytes | None = None) -> dict[str, Any]:
        request = urllib.request.Request(self.url + path, body, method=method)
        if body is not None:
            request.add_header("Content-Type", NPZ_TYPE)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            said = error.read().decode("utf-8", "replace")
            with contextlib.suppress(ValueError, AttributeError):
                said = json.loads(said).get("error", said)
            if 400 <= error.code < 500:
                raise UsageError(f"scoring service {self.url}: {said}") from None
            raise ServiceUnavailable(f"HTTP {error.code}: {said[:200]}") from None
        except (urllib.error.URLError, OSError, ValueError) as error:  # refused, timed out
            reason = getattr(error, "reason", error)
            raise ServiceUnavailable(str(reason) or type(error).__name__) from None


def line_spec(client: ServiceClient, out_dir: Path) -> tuple[LineSpec, str | None]:
    """The line's description from the service, kept in OUT; while the service does not
    answer, the one kept from before (and why the service was not asked)."""
    kept = out_dir / SPEC_FILE
    try:
        spec = client.spec()
    except ServiceUnavailable as error:
        if not kept.is_file():
            raise UsageError(
                f"the scoring service {client.url} does not answer ({error}) and this station "
                f"has never reached it; start it (musc-edge serve --config plant.yaml) or "
                "check --remote"
            ) from None
        return LineSpec.from_json(json.loads(kept.read_text())), str(error)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(kept, spec.to_json())
    return spec, None


class RemoteScheduler(BatchScheduler):
    """The line's batches, scored by the service in a worker thread; see the module
    docstring for what happens while it does not answer."""

    def __init__(
        self,
        client: ServiceClient,
        spec: LineSpec,
        batch_size: int,
        map_norm: str,
        max_wait: float | None,
    ) -> None:
        super().__init__(None, batch_size, map_norm, [None], batch_size, max_wait, overlap=True)
        self.client, self.spec = client, spec
        self.previous: deque[np.ndarray] = deque(maxlen=batch_size)  # the last parts sent
        self.sending: list[Part] = []  # the batch in flight, put back if it fails
        self.failure: str | None = None
        self.sent_at = 0.0  # when the batch in flight went out (monotonic)
        self.retry_at = 0.0
        self.pause = RETRY_FIRST

    def windows(self) -> list[Window]:
        return []  # the service rebuilds the window from the previous batch it is sent

    def room(self) -> int:
        return max(0, super().room())  # a batch put back may fill the hand past one batch

    def ready(self, finishing: bool) -> tuple[list[Scored], bool]:
        done, started = super().ready(finishing)
        if started:
            self.sent_at = time.monotonic()
        return done, started

    def _collect(self, future: Future[Scored]) -> list[Scored]:
        try:
            scored = future.result()
        except ServiceUnavailable as error:
            self._failed(str(error))
            return []
        self.failure, self.pause = None, RETRY_FIRST
        return [scored]

    def _due(self, finishing: bool) -> bool:
        """As a batch is due, but not before the pause after a failure has passed."""
        return time.monotonic() >= self.retry_at and super()._due(finishing)

    def _failed(self, why: str) -> None:
        """Keep the batch first in hand and try again after a pause."""
        self.in_hand = self.sending + self.in_hand
        self.failure = (
            f"scoring service {self.client.url} (line {self.client.line}) does not answer: "
            f"{why}; the parts wait in order (held, then in the camera folder) until it does"
        )
        self.retry_at = time.monotonic() + self.pause
        self.pause = min(RETRY_MAX, 2 * self.pause)

    def _score(self, parts: list[Part], profile: Profile) -> list[PartAnswers]:
        self.sending = parts  # read (in _collect) only once the future is done
        items = [part[0] for part in parts]  # a station judges one inspection (module doc)
        pixels = [item.pixels for item in items]
        previous = list(self.previous) if len(items) < RELIABLE_BATCH else []
        reply = self.client.score(pixels, previous, self.batch_size, self.map_norm)
        spec = self.spec
        used = (reply.get("model_sha256"), reply.get("calibration_sha256"))
        if used != (spec.model_sha256, spec.calibration_sha256):
            raise ServiceUnavailable(
                f"it now scores line {spec.line} with another model or calibration than this "
                "station started with; restart the station (with a new --out for a new model)"
            )
        if len(reply.get("answers", ())) != len(items):
            raise ServiceUnavailable(f"it answered {len(reply.get('answers', ()))} of {len(items)}")
        self.previous.extend(pixels)
        return [
            [answer_from_json(item, data)]
            for item, data in zip(items, reply["answers"], strict=True)
        ]

    @property
    def problem(self) -> str | None:
        """The service's failure, or its slowness while a batch is out past SLOW_AFTER."""
        slow = min(SLOW_AFTER, self.client.timeout / 2)
        if self.failure is None and self.scoring and time.monotonic() - self.sent_at > slow:
            return f"scoring service {self.client.url} is slow: a batch is out for over {slow:g} s"
        return self.failure


class RemoteBackend(Backend):
    """The service scores; the station prepares (resizes) and judges."""

    def __init__(self, client: ServiceClient, spec: LineSpec) -> None:
        self.client, self.spec = client, spec
        self.model_sha256 = spec.model_sha256
        self.model_name = f"line {spec.line} of {client.url}"
        self.preprocess = Preprocess.from_dict(spec.preprocess)

    def run_info(self) -> dict[str, Any]:
        return {
            "model": None,
            "service": self.client.url,
            "line": self.spec.line,
            "model_sha256": self.spec.model_sha256,
            "calibration_sha256": self.spec.calibration_sha256,
            "backbone": self.spec.backbone,
            "image_size": self.preprocess.image_size.to_json(),
            "engine": f"scoring service {self.client.url}",
        }

    def inspections(
        self, settings: LineSettings, history: Callable[[], Iterable[ResultRecord]]
    ) -> list[Inspection]:
        judge: Judge
        if settings.threshold is not None:
            judge = FixedJudge(settings.threshold)
        elif self.spec.judge is not None:
            judge = CalibratedJudge(**self.spec.judge)
        else:
            judge = HistoryJudge(history())
        region = None if self.spec.region is None else Region(*self.spec.region)
        return [Inspection(None, region, None, None, Verdicts(judge, settings.batch_size))]

    def scheduler(self, settings: LineSettings, known_good: list[KnownGood | None]) -> Scheduler:
        max_wait = settings.max_wait if settings.watch else None
        return RemoteScheduler(
            self.client, self.spec, settings.batch_size, settings.map_norm.value, max_wait
        )

    def prepare(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        return [{"pixels": self.preprocess.resized(image)} for image in images]
