"""What is wrong with the line's input right now, said once and shown wherever the line is
watched.

A camera folder that vanished (an unmounted share, a rotation gone wrong) or a subfolder the
service cannot read stops parts from arriving without any file to record a failure for. Each
such condition is a named problem: the line logs it once when it starts and once when it ends,
writes the current set to OUT/health.json (the live view's /healthz and /metrics read it, so
`musc-edge view` sees it too) and tells listeners (the MQTT status) at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from musc_edge.files import write_json_atomic
from musc_edge.runtime.record import utc_now

HEALTH_FILE = "health.json"
log = logging.getLogger(__name__)


class LineHealth:
    """The line's current problems by name (e.g. "camera"), each with its one-line message."""

    def __init__(self, out_dir: Path | None = None) -> None:
        self.path = out_dir / HEALTH_FILE if out_dir is not None else None
        self.problems: dict[str, str] = {}
        self.since = utc_now()
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self._write()

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> dict[str, Any]:
        """What /healthz, /metrics and the MQTT status show."""
        status = "ok" if self.ok else "degraded"
        return {"status": status, "problems": dict(self.problems), "since": self.since}

    def report(self, name: str, problem: str | None) -> None:
        """Set (a message) or clear (None) one problem; a change is logged and published."""
        if self.problems.get(name) == problem:
            return
        if problem is None:
            log.warning("%s: resolved (%s)", name, self.problems.pop(name))
        else:
            log.warning("%s", problem)
            self.problems[name] = problem
        self.since = utc_now()
        self._write()
        summary = self.summary()
        for listener in self.listeners:
            listener(summary)

    def _write(self) -> None:
        if self.path is not None:
            # the journal reports a full disk; health must never be what stops the line
            with contextlib.suppress(OSError):
                write_json_atomic(self.path, self.summary())


def read_health(out_dir: Path) -> dict[str, Any] | None:
    """OUT/health.json as the line last wrote it, or None (no line has run, or unreadable)."""
    try:
        data = json.loads((out_dir / HEALTH_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
