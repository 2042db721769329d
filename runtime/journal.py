"""results.jsonl, the line's source of truth, and the results.csv derived from it.

Every commit (one batch, or one image in rolling mode) is appended with a single write and
fsync'd, and each of its lines says how many lines the commit holds. At start a torn last line
or an incomplete last commit is cut off, so those images are scored again, exactly once; the
CSV is then rebuilt from the journal, so it can never disagree with it.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from musc_edge.files import write_atomic

RESULTS_FILE = "results.jsonl"
TABLE_FILE = "results.csv"
TABLE_COLUMNS = (
    "file",
    "sha256",
    "batch",
    "score",
    "raw_score",
    "label",
    "threshold",
    "features_ms",
    "score_ms",
    "latency_ms",
    "overlay",
    "mask",
    "error",
    "rejected",
)

Key = tuple[str, int, int]  # path relative to the camera folder, size, mtime in ns


class JournalError(ValueError):
    """A results.jsonl that cannot be trusted as it is; the message says how to fix it."""


def record_key(record: dict) -> Key:
    return record["file"], record["size"], record["mtime_ns"]


def table_row(record: dict) -> list:
    flat = {**(record.get("timings") or {}), **record}
    return ["" if flat.get(column) is None else flat[column] for column in TABLE_COLUMNS]


class Journal:
    """Append-only results of one output folder; `keys` are the files already answered."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / RESULTS_FILE
        self.table = out_dir / TABLE_FILE
        self.keys: set[Key] = set()
        self.last_commit = 0
        self.last_batch = 0
        self.last_batch_records: list[dict] = []
        self.dropped_lines = 0
        out_dir.mkdir(parents=True, exist_ok=True)
        self._recover()

    def _recover(self) -> None:
        """Read the journal, cut off a torn or incomplete last commit, rebuild the CSV."""
        data = self.path.read_bytes() if self.path.is_file() else b""
        *lines, torn = data.split(b"\n")
        records, ends = [], []
        position = 0
        for number, line in enumerate(lines, start=1):
            position += len(line) + 1
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if position < len(data):  # only the very last line may be torn
                    raise JournalError(
                        f"{self.path} line {number} is not valid JSON; it was changed by hand. "
                        "Fix or remove that line, or start a new --out folder"
                    ) from None
                break
            ends.append(position)
        keep = len(records)
        if records:
            last = records[-1]["commit"]
            tail = sum(1 for r in records if r["commit"] == last)
            if tail < records[-1]["commit_lines"]:
                keep -= tail
        good_length = ends[keep - 1] if keep else 0
        self.dropped_lines = len(lines) + bool(torn) - keep
        if good_length != len(data):
            with open(self.path, "r+b") as handle:
                handle.truncate(good_length)
                os.fsync(handle.fileno())
        for record in records[:keep]:
            self._remember(record)
        self._rebuild_table(records[:keep])

    def _remember(self, record: dict) -> None:
        self.keys.add(record_key(record))
        self.last_commit = record["commit"]
        if record.get("batch") is not None:
            if record["batch"] != self.last_batch:
                self.last_batch, self.last_batch_records = record["batch"], []
            self.last_batch_records.append(record)

    def _rebuild_table(self, records: list[dict]) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(TABLE_COLUMNS)
        writer.writerows(table_row(record) for record in records)
        write_atomic(self.table, buffer.getvalue())

    def commit(self, records: list[dict]) -> None:
        """Append the records as one commit, durable before this returns."""
        if not records:
            return
        commit = self.last_commit + 1
        for record in records:
            record.update(commit=commit, commit_lines=len(records))
        data = "".join(json.dumps(record) + "\n" for record in records).encode()
        with open(self.path, "ab") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        with open(self.table, "a", newline="") as handle:
            csv.writer(handle).writerows(table_row(record) for record in records)
        for record in records:
            self._remember(record)
