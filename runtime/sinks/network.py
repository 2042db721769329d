"""The one base of the network sinks (mqtt, webhook): options, outbox, delivery thread.

A commit only appends to the sink's outbox on disk (`outbox.py`) and returns; the outbox's
thread calls the subclass's `deliver` for each message in order, retrying with backoff, so a
slow or absent receiver never holds up the line and loses nothing. A subclass defines its
options model and `connect` / `deliver` / `disconnect`; everything else is here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from musc_edge.errors import UsageError
from musc_edge.runtime.record import ResultRecord
from musc_edge.runtime.sinks import CommitContext, SinkSetup, sink_options
from musc_edge.runtime.sinks.outbox import Message, Outbox, outbox_dir


class NetworkOptions(BaseModel):
    """Options every network sink takes, besides its own."""

    model_config = ConfigDict(extra="forbid")

    outbox_max: int = Field(100_000, ge=1)  # undelivered messages kept; the oldest go first
    flush_s: float = Field(5.0, ge=0)  # at stop, wait this long for the backlog to drain
    retry_s: float = Field(0.5, gt=0)  # first backoff after a failure, doubled each time
    retry_max_s: float = Field(30.0, gt=0)  # backoff cap
    timeout_s: float = Field(10.0, gt=0)  # one delivery: the broker's PUBACK, the HTTP answer


def secret_from_env(sink: str, option: str, variable: str) -> str:
    """A password or token from the environment variable an option names, so the secret is
    never on a command line or in a config file; its value is never in a message."""
    value = os.environ.get(variable)
    if not value:
        raise UsageError(
            f"sink {sink}: {option}={variable}, but that environment variable is unset"
        )
    return value


class NetworkSink:
    """Commit = enqueue on disk; flush = wait (bounded) for the backlog; close = stop and keep
    the undelivered for the next start."""

    Options: ClassVar[type[NetworkOptions]] = NetworkOptions

    def __init__(self, setup: SinkSetup) -> None:
        self.name = setup.name
        self.health = setup.health
        self._closed = False
        self.options = sink_options(self.Options, setup)
        options = self.options
        self.outbox = Outbox(
            outbox_dir(setup.out_dir, setup.name),
            setup.journal.records(),
            options.outbox_max,
            options.retry_s,
            options.retry_max_s,
        )
        self.connect()
        self.outbox.start(self.deliver)

    def connect(self) -> None:
        """Set up the connection; must not wait for the network (it may be down at start)."""

    def deliver(self, message: Message) -> None:
        """Send one message; return once the receiver has it, raise otherwise."""
        raise NotImplementedError

    def disconnect(self) -> None:
        """Release the connection; delivery has stopped."""

    def commit(self, records: Sequence[ResultRecord], context: CommitContext) -> None:
        self.outbox.put(records)

    def flush(self) -> None:
        self.outbox.drain(self.options.flush_s)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.outbox.close(self.options.timeout_s + 1)
        self.disconnect()
