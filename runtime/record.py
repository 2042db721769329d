"""The result record: one file's answer, the single definition of what the line reports.

Its fields are the JSONL line of the journal, the columns of the CSV (timings flattened) and
the entry of a batch manifest, so adding a field here adds it everywhere at once.

Every text in a record is valid UTF-8, whatever the camera's file names are: a name that is
not UTF-8 is shown with its odd bytes as `\\xNN` and its exact bytes are kept, base64, in
`file_bytes_b64` (docs/runtime.md, "File names").
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

from pydantic import ConfigDict, StrictInt, TypeAdapter, ValidationError

from musc_edge.errors import MuscEdgeError
from musc_edge.names import is_printable, name_bytes, printable

Key = tuple[str, int, int, int]  # path relative to the camera folder, size, mtime, ctime (ns)
# the record's fields no stored line may lack although a record has them before its commit
COMMIT_FIELDS = ("commit", "commit_lines")


class RecordError(MuscEdgeError, ValueError):
    """A stored line that is not a result record; the message says which field is wrong."""


@dataclass
class Timings:
    """Milliseconds per image: features on arrival, the scoring call, ready -> answered."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    features_ms: float | None = None
    score_ms: float | None = None
    latency_ms: float | None = None
    # the scoring call's stages (lnamd, bank, msm, rscin, maps, guard; musc_edge/profile.py)
    stages_ms: dict[str, float] | None = None


@dataclass
class ItemResult:
    """One inspection item's verdict within an image's record (runtime/inspections.py)."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    name: str
    region: list[int] | None  # x, y, width, height
    score: float
    raw_score: float | None  # None: the line does not score mutually (a calibration alone)
    reference_score: float | None
    label: str | None
    threshold: float | None
    threshold_basis: str
    calibrated: bool
    shift: bool
    repeated: bool
    joined_references: bool


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class ResultRecord:
    """What the line says about one camera file: scores and label, or why it failed."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # a stored line is checked against it

    file: str  # path relative to the camera folder, as valid UTF-8 (see file_bytes_b64)
    size: StrictInt
    mtime_ns: StrictInt
    ctime_ns: StrictInt  # a writer can restore the mtime, never the inode change time
    sha256: str | None
    batch: StrictInt
    mode: str
    score: float | None = None  # what the label is on, in patch-distance units (verdicts.md)
    raw_score: float | None = None  # max mutual patch distance; None: not scored mutually
    reference_score: float | None = None  # max distance to the known-good parts (calibrated)
    label: str | None = None  # "anomalous", "normal", or None without a threshold
    threshold: float | None = None
    threshold_basis: str | None = None  # "calibration", "history" or "fixed"
    calibrated: bool = False  # False: the threshold is not from known-good parts
    shift: bool = False  # this commit's scores left the normal band (verdicts.md)
    repeated: bool = False  # a defect repeating on several parts (docs/verdicts.md)
    joined_references: bool = False  # joined the known-good references (--refresh-references)
    overlay: str | None = None  # paths relative to the out folder
    mask: str | None = None
    timings: Timings = field(default_factory=Timings)
    warning: str | None = None
    error: str | None = None
    rejected: str | None = None  # where a copy of an unscorable file was put
    recorded_at: str = field(default_factory=utc_now)
    # only for a name that is not UTF-8: its exact bytes, base64 (`file` shows them as \xNN)
    file_bytes_b64: str | None = None
    model_sha256: str | None = None  # the model package that scored it (package.sha256)
    # a line with several inspection items: each item's verdict, and the item the record's
    # own verdict, score and threshold are taken from (the worst one)
    items: list[ItemResult] | None = None
    item: str | None = None
    commit: StrictInt = 0  # the journal commit that holds this record, and that commit's size
    commit_lines: StrictInt = 0

    def __post_init__(self) -> None:
        """Keep every text valid UTF-8; a name that is not keeps its bytes beside it."""
        if not is_printable(self.file):
            self.file_bytes_b64 = base64.b64encode(name_bytes(self.file)).decode("ascii")
            self.file = printable(self.file)
        self.error = self.error and printable(self.error)
        self.warning = self.warning and printable(self.warning)

    @property
    def key(self) -> Key:
        """What identifies the file version answered: its exact name, size, mtime, ctime."""
        name = self.file
        if self.file_bytes_b64 is not None:
            name = os.fsdecode(base64.b64decode(self.file_bytes_b64))
        return name, self.size, self.mtime_ns, self.ctime_ns

    @property
    def record_id(self) -> str:
        """A stable id of this answer: the same after a crash and a re-score of the same file
        version, so a receiver can drop a record it has already had."""
        text = "\0".join(str(part) for part in self.key)
        return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:24]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def message(self) -> dict[str, Any]:
        """What network sinks send: the stored record with its stable `id` first."""
        return {"id": self.record_id, **self.to_dict()}

    @classmethod
    def from_dict(cls, data: object) -> ResultRecord:
        """Parse one stored record against the fields' own types, or a RecordError naming
        what does not fit."""
        if isinstance(data, dict) and (missing := [f for f in COMMIT_FIELDS if f not in data]):
            raise RecordError(f"the record lacks {', '.join(missing)}")
        try:
            return _SCHEMA.validate_python(data)
        except ValidationError as error:
            problem = error.errors()[0]
            where = ".".join(str(part) for part in problem["loc"]) or "the line"
            raise RecordError(f"{where}: {problem['msg']}") from None


_SCHEMA = TypeAdapter(ResultRecord)
TABLE_COLUMNS = tuple(
    name
    for f in fields(ResultRecord)
    if f.name
    not in (
        "size",
        "mtime_ns",
        "ctime_ns",
        "mode",
        "recorded_at",
        "commit",
        "commit_lines",
        "model_sha256",
        "items",
    )
    for name in (
        [t.name for t in fields(Timings) if t.name != "stages_ms"]
        if f.name == "timings"
        else [f.name]
    )
)


def table_row(record: ResultRecord) -> list:
    """The record as CSV cells in TABLE_COLUMNS order, timings flattened, None empty."""
    flat = {**asdict(record.timings), **asdict(record)}  # stages_ms: the journal only
    return ["" if flat[column] is None else flat[column] for column in TABLE_COLUMNS]
