"""The result record: one file's answer, the single definition of what the line reports.

Its fields are the JSONL line of the journal, the columns of the CSV (timings flattened) and
the entry of a batch manifest, so adding a field here adds it everywhere at once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

from musc_edge.errors import MuscEdgeError


class RecordError(MuscEdgeError, ValueError):
    """A stored line that is not a result record; the message says which field is wrong."""


@dataclass
class Timings:
    """Milliseconds per image: features on arrival, the scoring call, ready -> answered."""

    features_ms: float | None = None
    score_ms: float | None = None
    latency_ms: float | None = None


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class ResultRecord:
    """What the line says about one camera file: scores and label, or why it failed."""

    file: str  # path relative to the camera folder
    size: int
    mtime_ns: int
    ctime_ns: int  # a writer can restore the mtime, never the inode change time
    sha256: str | None
    batch: int
    mode: str
    score: float | None = None  # RsCIN score within the batch or window
    raw_score: float | None = None  # max patch distance
    label: str | None = None  # "anomalous", "normal", or None without a threshold
    threshold: float | None = None
    overlay: str | None = None  # paths relative to the out folder
    mask: str | None = None
    timings: Timings = field(default_factory=Timings)
    warning: str | None = None
    error: str | None = None
    rejected: str | None = None  # where a copy of an unscorable file was put
    recorded_at: str = field(default_factory=utc_now)
    commit: int = 0  # the journal commit that holds this record, and that commit's size
    commit_lines: int = 0

    @property
    def key(self) -> tuple[str, int, int, int]:
        """What identifies the file version answered: name, size, mtime, ctime."""
        return self.file, self.size, self.mtime_ns, self.ctime_ns

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> ResultRecord:
        """Parse one stored record, or a RecordError naming what does not fit."""
        if not isinstance(data, dict):
            raise RecordError(f"a result record is a JSON object, not {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        missing = sorted(f.name for f in fields(cls) if f.name not in data and f.name in REQUIRED)
        if missing:
            raise RecordError(f"the record lacks {', '.join(missing)}")
        unknown = sorted(set(data) - names)
        if unknown:
            raise RecordError(f"the record has unknown fields {', '.join(unknown)}")
        values = dict(data)
        timings = values.get("timings") or {}
        if not isinstance(timings, dict) or set(timings) - {f.name for f in fields(Timings)}:
            raise RecordError(f"the record's timings {timings!r} are not timings")
        values["timings"] = Timings(**timings)
        for name in ("size", "mtime_ns", "ctime_ns", "batch", "commit", "commit_lines"):
            if not isinstance(values.get(name), int) or isinstance(values.get(name), bool):
                raise RecordError(f"the record's {name} {values.get(name)!r} is not an integer")
        return cls(**values)


REQUIRED = (
    "file",
    "size",
    "mtime_ns",
    "ctime_ns",
    "sha256",
    "batch",
    "mode",
    "commit",
    "commit_lines",
)
TABLE_COLUMNS = tuple(
    name
    for f in fields(ResultRecord)
    if f.name
    not in ("size", "mtime_ns", "ctime_ns", "mode", "recorded_at", "commit", "commit_lines")
    for name in ([t.name for t in fields(Timings)] if f.name == "timings" else [f.name])
)


def table_row(record: ResultRecord) -> list:
    """The record as CSV cells in TABLE_COLUMNS order, timings flattened, None empty."""
    flat = {**asdict(record.timings), **asdict(record)}
    return ["" if flat[column] is None else flat[column] for column in TABLE_COLUMNS]
