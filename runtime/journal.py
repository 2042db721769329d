"""results.jsonl, the line's source of truth, and a sink like the others.

Every commit (one batch, or one image in rolling mode) is appended with a single write and
fsync'd, and each of its lines says how many lines the commit holds. At start a torn last line
or an incomplete last commit is cut off, so those images are scored again, exactly once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from musc_edge.errors import MuscEdgeError
from musc_edge.runtime.record import Key, RecordError, ResultRecord

RESULTS_FILE = "results.jsonl"


class JournalError(MuscEdgeError, ValueError):
    """A results.jsonl that cannot be trusted as it is; the message says how to fix it."""


def changed_by_hand(path: Path, number: int, why: str) -> JournalError:
    return JournalError(
        f"{path} line {number} {why}; it was changed by hand. Fix or remove that line, or "
        "start a new --out folder"
    )


class Journal:
    """Append-only results of one output folder; `keys` are the files already answered."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / RESULTS_FILE
        self.keys: set[Key] = set()
        self.contents: set[tuple[str, str]] = set()  # (file, sha256) of every answer
        self.models: set[str] = set()  # model_sha256 of the packages that scored them
        self.last_commit = 0
        self.last_batch = 0
        self.last_batch_records: list[ResultRecord] = []
        self.dropped_lines = 0
        out_dir.mkdir(parents=True, exist_ok=True)
        self._recover()

    def _recover(self) -> None:
        """Read the journal and cut off a torn or incomplete last commit."""
        data = self.path.read_bytes() if self.path.is_file() else b""
        *lines, torn = data.split(b"\n")
        records: list[ResultRecord] = []
        ends = []
        position = 0
        for number, line in enumerate(lines, start=1):
            position += len(line) + 1
            try:
                records.append(ResultRecord.from_dict(json.loads(line)))
            except json.JSONDecodeError:
                if position < len(data):  # only the very last line may be torn
                    raise changed_by_hand(self.path, number, "is not valid JSON") from None
                break
            except RecordError as error:
                raise changed_by_hand(
                    self.path, number, f"is not a result record ({error})"
                ) from None
            ends.append(position)
        keep = len(records)
        if records:
            last = records[-1].commit
            tail = sum(1 for r in records if r.commit == last)
            if tail < records[-1].commit_lines:
                keep -= tail
        good_length = ends[keep - 1] if keep else 0
        self.dropped_lines = len(lines) + bool(torn) - keep
        if good_length != len(data):
            with open(self.path, "r+b") as handle:
                handle.truncate(good_length)
                os.fsync(handle.fileno())
        for record in records[:keep]:
            self._remember(record)

    def records(self) -> Iterator[ResultRecord]:
        """Every committed record, read back from disk (for sinks rebuilt at start)."""
        if self.path.is_file():
            with open(self.path) as handle:
                for line in handle:
                    yield ResultRecord.from_dict(json.loads(line))

    def _remember(self, record: ResultRecord) -> None:
        self.keys.add(record.key)
        if record.sha256:
            self.contents.add((record.key[0], record.sha256))
        if record.model_sha256:
            self.models.add(record.model_sha256)
        self.last_commit = record.commit
        if record.batch != self.last_batch:
            self.last_batch, self.last_batch_records = record.batch, []
        self.last_batch_records.append(record)

    def commit(self, records: Sequence[ResultRecord], context: object = None) -> None:
        """Append the records as one commit, durable before this returns."""
        if not records:
            return
        commit = self.last_commit + 1
        for record in records:
            record.commit, record.commit_lines = commit, len(records)
        data = "".join(json.dumps(record.to_dict()) + "\n" for record in records).encode()
        with open(self.path, "ab") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        for record in records:
            self._remember(record)

    def flush(self) -> None:
        """Every commit is fsync'd before `commit` returns."""

    def close(self) -> None:
        """Nothing is held open between commits."""
