"""The outbox of a network sink: an ordered queue on disk, so an outage or a crash loses nothing.

`OUT/outbox/<sink>/` holds the messages (each record's `message()`, one JSON line) in segment
files named by the number of their first message, and `state.json`: the cursor (every message
up to it is delivered or dropped), the count of dropped messages and the highest journal
commit enqueued. A commit is appended and fsync'd before the line goes on; one thread hands
the messages in order to the sink's `deliver`, retrying with exponential backoff, and moves
the cursor after each success, so a restart resumes where the last run stopped (at least
once: a receiver drops repeats by the message's stable `id`). Fully delivered segments are
deleted, so the folder holds only the backlog. The journal is written before any extra sink,
so at open every journal commit above the highest enqueued one is enqueued: a crash between
the two writes loses nothing. When more than `limit` messages wait, the oldest are dropped
and counted; results.jsonl still holds them.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from musc_edge.errors import MuscEdgeError
from musc_edge.files import write_atomic
from musc_edge.runtime.record import ResultRecord

log = logging.getLogger(__name__)

OUTBOX_DIR = "outbox"
STATE_FILE = "state.json"
SEGMENT_SUFFIX = ".jsonl"
SEGMENT_LINES = 1000  # a new segment starts once the newest holds this many messages
DROP_WARNING_EVERY_S = 60.0  # a full outbox in a long outage warns once a minute, not per commit

Message = dict[str, Any]


class OutboxError(MuscEdgeError):
    """An outbox folder that cannot be read back; the message says how to recover."""


@dataclass
class OutboxState:
    """What `state.json` keeps; rewritten atomically whenever the cursor moves."""

    cursor: int = 0  # every message numbered up to this one is delivered or dropped
    dropped: int = 0  # dropped undelivered because the outbox was full
    commit: int = 0  # the highest journal commit enqueued


def outbox_dir(out_dir: Path, sink: str) -> Path:
    return out_dir / OUTBOX_DIR / sink


def read_state(folder: Path) -> OutboxState:
    """The folder's state; a fresh one if there is none or it is damaged (a power cut during
    its rename): then every message still on disk is sent again, which receivers drop."""
    path = folder / STATE_FILE
    try:
        return OutboxState(**json.loads(path.read_text()))
    except FileNotFoundError:
        return OutboxState()
    except (ValueError, TypeError):
        log.warning("%s is damaged; the messages still in %s are sent again", path, folder)
        return OutboxState()


def _segments(folder: Path) -> list[int]:
    """The first message numbers of the segment files, in order."""
    names = (path.name for path in folder.glob(f"*{SEGMENT_SUFFIX}"))
    numbers = (name.removesuffix(SEGMENT_SUFFIX) for name in names)
    return sorted(int(number) for number in numbers if number.isdigit())


def _segment_path(folder: Path, first: int) -> Path:
    return folder / f"{first:020d}{SEGMENT_SUFFIX}"


def _count_lines(path: Path) -> int:
    """Complete lines only: a message being appended is not counted until its newline."""
    return path.read_bytes().count(b"\n")


def _undelivered(folder: Path) -> int:
    """Messages of one outbox not yet delivered, from its files alone (the newest segment, at
    most about SEGMENT_LINES lines, and the state), so another process may ask at any time."""
    firsts = _segments(folder)
    if not firsts:
        return 0
    try:
        last = firsts[-1] + _count_lines(_segment_path(folder, firsts[-1])) - 1
    except FileNotFoundError:
        return 0  # delivered and deleted since the listing
    cursor = max(read_state(folder).cursor, firsts[0] - 1)
    return max(0, last - cursor)


def backlog(out_dir: Path) -> dict[str, int]:
    """Undelivered messages per network sink of an out folder, e.g. `{"mqtt": 0}`; cheap and
    safe to call from another process while the line writes (a snapshot, not a lock)."""
    root = out_dir / OUTBOX_DIR
    if not root.is_dir():
        return {}
    return {
        folder.name: _undelivered(folder) for folder in sorted(root.iterdir()) if folder.is_dir()
    }


def _commit_of(path: Path, line: bytes) -> tuple[int, int]:
    """A stored message's journal commit and the number of lines that commit holds."""
    try:
        message = json.loads(line)
        return int(message["commit"]), int(message["commit_lines"])
    except (ValueError, KeyError, TypeError):
        raise OutboxError(
            f"{path} holds a line that is not a result message; delete the folder "
            f"{path.parent} and the next start sends every result of results.jsonl again"
        ) from None


def _unfinished(path: Path, lines: list[bytes]) -> int:
    """How many last lines belong to a commit whose write a crash cut short (0 if none)."""
    commit, size = _commit_of(path, lines[-1])
    same = 0
    for line in reversed(lines[-size:]):
        if _commit_of(path, line)[0] != commit:
            break
        same += 1
    return 0 if same == size else same


def _fsync_dir(folder: Path) -> None:
    """A new segment's name survives a power cut too, not only its content."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


class Outbox:
    """One network sink's queue: `put` on the line's thread, `start(deliver)` runs the sender."""

    def __init__(
        self,
        folder: Path,
        journal: Iterable[ResultRecord],
        limit: int = 100_000,
        retry_s: float = 0.5,
        retry_max_s: float = 30.0,
    ) -> None:
        self.folder = folder
        self.name = folder.name
        self.limit = limit
        self.retry_s, self.retry_max_s = retry_s, retry_max_s
        self._changed = threading.Condition()
        self._stopping = False
        self._nudged = False
        self._thread: threading.Thread | None = None
        self._reading: tuple[int, BinaryIO] | None = None  # segment open for reading, its handle
        self._next_line = 0  # number of the message the reading handle is at
        self._unreported = 0  # dropped since the last warning
        self._warn_at = 0.0
        folder.mkdir(parents=True, exist_ok=True)
        self.state = read_state(folder)
        self.segments = _segments(folder)
        self.last = self._recover()
        if self.segments:
            self.state.cursor = max(self.state.cursor, self.segments[0] - 1)
        self._forget_done()
        enqueued = self.state.commit
        missing = (record for record in journal if record.commit > enqueued)
        for chunk in _whole_commits(missing, SEGMENT_LINES):
            self.put(chunk)

    def _recover(self) -> int:
        """Cut off the newest segment's torn last line and a commit whose write did not finish
        (the journal has it, so it is enqueued again); the number of the last message. The
        highest commit enqueued goes into the state."""
        while self.segments:
            path = _segment_path(self.folder, self.segments[-1])
            data = path.read_bytes()
            lines = data[: data.rfind(b"\n") + 1].splitlines(keepends=True)
            if lines:
                del lines[len(lines) - _unfinished(path, lines) :]
            keep = sum(map(len, lines))
            if keep < len(data):
                with open(path, "r+b") as handle:
                    handle.truncate(keep)
                    os.fsync(handle.fileno())
            if lines:
                self.state.commit = max(self.state.commit, _commit_of(path, lines[-1])[0])
                return max(self.state.cursor, self.segments[-1] + len(lines) - 1)
            path.unlink()
            self.segments.pop()
        return self.state.cursor

    @property
    def backlog(self) -> int:
        """Messages not yet delivered (nor dropped)."""
        with self._changed:
            return self.last - self.state.cursor

    def put(self, records: Sequence[ResultRecord]) -> None:
        """Append the records' messages in order, durable before this returns; drop the
        oldest undelivered beyond the limit."""
        if not records:
            return
        data = "".join(json.dumps(record.message()) + "\n" for record in records).encode()
        with self._changed:
            new = not self.segments or self.last + 1 - self.segments[-1] >= SEGMENT_LINES
            if new:
                self.segments.append(self.last + 1)
            with open(_segment_path(self.folder, self.segments[-1]), "ab") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            if new:
                _fsync_dir(self.folder)
            self.last += len(records)
            self.state.commit = max(self.state.commit, records[-1].commit)
            excess = self.last - self.state.cursor - self.limit
            if excess > 0:
                self._drop(excess)
            self._changed.notify_all()

    def _drop(self, count: int) -> None:
        self.state.cursor += count
        self.state.dropped += count
        self._save()
        self._forget_done()
        self._unreported += count
        if time.monotonic() >= self._warn_at:
            self._report_drops()

    def _report_drops(self) -> None:
        log.warning(
            "sink %s: outbox full (outbox_max %d): dropped %d of the oldest undelivered "
            "message(s), %d in all; results.jsonl still holds them",
            self.name,
            self.limit,
            self._unreported,
            self.state.dropped,
        )
        self._unreported = 0
        self._warn_at = time.monotonic() + DROP_WARNING_EVERY_S

    def _save(self) -> None:
        write_atomic(self.folder / STATE_FILE, json.dumps(asdict(self.state)))

    def _forget_done(self) -> None:
        """Delete the segments whose every message is delivered or dropped (after `_save`)."""
        while self.segments:
            last = self.segments[1] - 1 if len(self.segments) > 1 else self.last
            if last > self.state.cursor:
                return
            _segment_path(self.folder, self.segments.pop(0)).unlink(missing_ok=True)

    def _read(self, number: int) -> Message:
        """Message `number` (at most `last`, so written in full); called holding the lock."""
        first = self.segments[bisect_right(self.segments, number) - 1]
        if self._reading is None or self._reading[0] != first or self._next_line > number:
            self._close_reading()
            handle = open(_segment_path(self.folder, first), "rb")  # noqa: SIM115 (kept open)
            self._reading = first, handle
            self._next_line = first
        handle = self._reading[1]
        while self._next_line < number:
            handle.readline()
            self._next_line += 1
        self._next_line += 1
        return json.loads(handle.readline())

    def _close_reading(self) -> None:
        if self._reading is not None:
            self._reading[1].close()
            self._reading = None

    def start(self, deliver: Callable[[Message], None]) -> None:
        """Send the backlog and every new message, in order, on a thread of its own."""
        self._thread = threading.Thread(
            target=self._send, args=(deliver,), name=f"musc-edge {self.name} outbox", daemon=True
        )
        self._thread.start()

    def _send(self, deliver: Callable[[Message], None]) -> None:
        delay, failures = self.retry_s, 0
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._stopping or self.last > self.state.cursor)
                if self._stopping:
                    return
                number = self.state.cursor + 1
                message = self._read(number)
            try:
                deliver(message)
            except Exception as error:  # whatever the network says, the line goes on
                failures += 1
                log.warning(
                    "sink %s: delivery failed (%s); retry in %.1f s, %d undelivered",
                    self.name,
                    error,
                    delay,
                    self.backlog,
                )
                if self._pause(delay):
                    return
                delay = min(delay * 2, self.retry_max_s)
                continue
            if failures:
                log.info("sink %s: delivering again after %d failure(s)", self.name, failures)
            delay, failures = self.retry_s, 0
            self._delivered(number)

    def _pause(self, delay: float) -> bool:
        """Wait out a backoff step, or until nudged; True when stopping."""
        with self._changed:
            self._changed.wait_for(lambda: self._stopping or self._nudged, delay)
            self._nudged = False
            return self._stopping

    def nudge(self) -> None:
        """Retry now rather than at the end of the backoff (e.g. the broker is back)."""
        with self._changed:
            self._nudged = True
            self._changed.notify_all()

    def _delivered(self, number: int) -> None:
        with self._changed:
            if number > self.state.cursor:  # not dropped while it was in flight
                self.state.cursor = number
                self._save()
                self._forget_done()
            self._changed.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the backlog to be delivered; True if it was."""
        with self._changed:
            return self._changed.wait_for(lambda: self.last == self.state.cursor, timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Stop sending (a delivery in flight may finish within `timeout`); the undelivered
        stay on disk for the next start."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._changed:
            self._close_reading()
            remaining = self.last - self.state.cursor
            if self._unreported:
                self._report_drops()
        if remaining:
            log.warning(
                "sink %s: %d message(s) undelivered, kept in %s for the next start",
                self.name,
                remaining,
                self.folder,
            )


def _whole_commits(records: Iterable[ResultRecord], size: int) -> Iterator[list[ResultRecord]]:
    """Groups of about `size` records that never split a commit, so each commit is written
    by one `put` into one segment, as the line's own commits are."""
    group: list[ResultRecord] = []
    for record in records:
        if len(group) >= size and record.commit != group[-1].commit:
            yield group
            group = []
        group.append(record)
    if group:
        yield group
