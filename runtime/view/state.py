"""What the live view shows, followed from the out folder the line writes.

results.jsonl is the source of truth, so the view reads nothing else of the line's: a
`JournalTail` reads the lines appended since the last poll (never the whole file again) and a
bounded `ViewState` keeps what the page needs, however long the journal grows. The batch
manifests add the run's settings and the network sinks' outbox its backlog.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import Any

from musc_edge.errors import MuscEdgeError
from musc_edge.runtime.counts import Counts
from musc_edge.runtime.health import read_health
from musc_edge.runtime.journal import RESULTS_FILE
from musc_edge.runtime.outputs import batch_dir
from musc_edge.runtime.sinks.manifest import MANIFEST_FILE, read_manifest

RECENT = 50  # cards on the page, newest first
TIMELINE = 500  # scored parts in the score timeline
LATENCIES = 200  # scored parts the median latency is over
RATE_WINDOW_S = 60.0  # throughput: the last minute of records
READ_CHUNK = 4 << 20  # bytes per read, so a long journal is taken in bounded steps
CATCH_UP_S = 0.5  # a poll reads for at most this long: a long journal is shown as it is read
BACKLOG_EVERY_S = 2.0  # the outbox is asked this often, not at every poll
RUN_FACTS = (
    "mode",
    "backbone",
    "image_size",
    "engine",
    "msm_precision",
    "threshold_basis",
    "known_good_parts",
    "frr_upper_bound",
    "camera_dir",
    "model",
)

CARD_FIELDS = (
    "file",
    "batch",
    "commit",
    "score",
    "label",
    "item",
    "threshold",
    "shift",
    "repeated",
    "error",
    "warning",
    "overlay",
    "mask",
    "recorded_at",
)

log = logging.getLogger(__name__)


class JournalTail:
    """Follows results.jsonl by byte offset and hands out each complete line once.

    A torn last line (a commit being written) stays unread until its newline arrives. A file
    that shrank was cut back by a restarting line (a torn commit dropped), so the tail starts
    over and says so.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.behind = False  # the last read stopped before the end of the file

    def read(self) -> tuple[list[dict[str, Any]], bool]:
        """(new records, whether the journal was cut back and the caller must start over)."""
        try:
            with open(self.path, "rb") as handle:
                restarted = os.fstat(handle.fileno()).st_size < self.offset
                if restarted:
                    self.offset = 0
                handle.seek(self.offset)
                data = handle.read(READ_CHUNK)
        except FileNotFoundError:
            return [], False
        self.behind = len(data) == READ_CHUNK
        complete = data[: data.rfind(b"\n") + 1]
        if self.behind and not complete:  # no record is that long: pass over it
            complete = data
        self.offset += len(complete)
        return [record for line in complete.splitlines() if (record := parse(line))], restarted


def parse(line: bytes) -> dict[str, Any] | None:
    """One journal line as a dict; a line that is not a JSON object is passed over (the line
    itself refuses to start on such a journal and says which line it is)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def epoch(timestamp: object) -> float | None:
    try:
        return datetime.fromisoformat(str(timestamp)).timestamp()
    except ValueError:
        return None


def card(record: dict[str, Any]) -> dict[str, Any]:
    """What a part's card on the page shows; `id` stays the same across updates."""
    return {
        "id": f"{record.get('commit')}/{record.get('file')}",
        **{name: record.get(name) for name in CARD_FIELDS},
        "latency_ms": (record.get("timings") or {}).get("latency_ms"),
    }


class ViewState:
    """The journal folded into what the page shows, bounded in memory."""

    def __init__(self) -> None:
        self.counts = Counts()
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.scores: deque[float] = deque(maxlen=TIMELINE)
        self.thresholds: deque[float | None] = deque(maxlen=TIMELINE)
        self.labels: deque[str | None] = deque(maxlen=TIMELINE)
        self.latencies: deque[float] = deque(maxlen=LATENCIES)
        self.times: deque[tuple[float, object]] = deque()  # (epoch, commit), last minute
        self.latest: dict[str, Any] | None = None  # the newest scored record
        self.last_record_at: str | None = None
        self.last_batch: object = None
        self.shift_commit: object = None  # the newest scored commit, and whether it shifted
        self.shift = False

    def add(self, record: dict[str, Any]) -> None:
        self.counts.add(record)
        self.recent.appendleft(card(record))
        self.last_record_at = record.get("recorded_at")
        self.last_batch = record.get("batch")
        self._time(record)
        if record.get("error") is not None or record.get("score") is None:
            return
        self.latest = record
        self.scores.append(record["score"])
        self.thresholds.append(record.get("threshold"))
        self.labels.append(record.get("label"))
        latency = (record.get("timings") or {}).get("latency_ms")
        if latency is not None:
            self.latencies.append(latency)
        if record.get("commit") != self.shift_commit:
            self.shift_commit, self.shift = record.get("commit"), False
        self.shift = self.shift or bool(record.get("shift"))

    def _time(self, record: dict[str, Any]) -> None:
        at = epoch(record.get("recorded_at"))
        if at is None:
            return
        self.times.append((at, record.get("commit")))
        while self.times[0][0] < at - RATE_WINDOW_S:
            self.times.popleft()

    def throughput(self) -> float | None:
        """Parts per minute over the last minute of records: the parts of the commits after
        the window's first one, over the time since it (a commit's parts come at once)."""
        if not self.times:
            return None
        (first, first_commit), (last, _) = self.times[0], self.times[-1]
        after = sum(1 for _, commit in self.times if commit != first_commit)
        return 60 * after / (last - first) if last > first else None

    def summary(self) -> dict[str, Any]:
        latest = self.latest or {}
        return {
            "records": self.counts.seen,
            "counts": self.counts.to_dict(),
            "recent": list(self.recent),
            "timeline": {
                "score": list(self.scores),
                "threshold": list(self.thresholds),
                "label": list(self.labels),
            },
            "last_score": latest.get("score"),
            "threshold": latest.get("threshold"),
            "threshold_basis": latest.get("threshold_basis"),
            "calibrated": latest.get("calibrated"),  # None until a part is scored
            "shift": self.shift,
            "throughput_per_minute": self.throughput(),
            "median_latency_ms": statistics.median(self.latencies) if self.latencies else None,
            "last_record_at": self.last_record_at,
        }


def sink_backlog(out_dir: Path) -> dict[str, int] | None:
    """Messages waiting in each network sink's outbox, where the outbox module is installed."""
    try:
        from musc_edge.runtime.sinks import outbox
    except ImportError:
        return None
    try:
        return outbox.backlog(out_dir)
    except (OSError, MuscEdgeError) as error:  # the page goes on without it
        log.warning("sink backlog of %s unreadable: %s", out_dir, error)
        return None


def run_facts(out_dir: Path, batch: int) -> dict[str, Any] | None:
    """The run's settings (model, engine, mode, ...) from a batch's manifest, if written."""
    try:
        manifest = read_manifest(batch_dir(out_dir, batch) / MANIFEST_FILE)
    except (OSError, ValueError):
        return None
    return {name: manifest.get(name) for name in RUN_FACTS}


class OutFolderView:
    """Polls one out folder: the journal's new lines, the run facts and the sink backlog."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.tail = JournalTail(out_dir / RESULTS_FILE)
        self.state = ViewState()
        self.run: dict[str, Any] | None = None
        self.run_batch: int | None = None  # the batch whose manifest gave `run`
        self.backlog: dict[str, int] | None = None
        self.backlog_at = -BACKLOG_EVERY_S
        self.health: dict[str, Any] | None = None

    @property
    def behind(self) -> bool:
        """The journal holds more than the last poll had time to read."""
        return self.tail.behind

    def poll(self) -> bool:
        """Take what is new (for at most CATCH_UP_S); True when the page has news."""
        started = time.monotonic()
        changed = False
        while True:
            records, restarted = self.tail.read()
            if restarted:
                self.state, changed = ViewState(), True
            for record in records:
                self.state.add(record)
            changed |= bool(records)
            if not self.tail.behind or time.monotonic() - started > CATCH_UP_S:
                break
        return self._poll_run() | self._poll_backlog() | self._poll_health() | changed

    def _poll_health(self) -> bool:
        health, self.health = self.health, read_health(self.out_dir)
        return health != self.health

    def _poll_run(self) -> bool:
        batch = self.state.last_batch
        if not isinstance(batch, int) or batch == self.run_batch:
            return False
        facts = run_facts(self.out_dir, batch)
        if facts is None:  # the manifest is written after the journal: next poll
            return False
        self.run_batch, changed, self.run = batch, facts != self.run, facts
        return changed

    def _poll_backlog(self) -> bool:
        if time.monotonic() - self.backlog_at < BACKLOG_EVERY_S:
            return False
        self.backlog_at = time.monotonic()
        backlog, self.backlog = self.backlog, sink_backlog(self.out_dir)
        return backlog != self.backlog

    def snapshot(self) -> dict[str, Any]:
        """The whole page's data, as /api/state and every event send it."""
        return {
            "out_dir": str(self.out_dir),
            **self.state.summary(),
            "backlog": self.backlog,
            "run": self.run,
            "health": self.health,  # None: no line has written health.json here
        }
