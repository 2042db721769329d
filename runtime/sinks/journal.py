"""The `journal` sink: the line's `Journal` (results.jsonl), opened once by the line."""

from __future__ import annotations

from musc_edge.runtime.journal import Journal
from musc_edge.runtime.sinks import SinkSetup, register_sink


@register_sink("journal")
def journal_sink(setup: SinkSetup) -> Journal:
    """The journal the line recovered at start: the camera reads its keys, so it is shared."""
    return setup.journal
