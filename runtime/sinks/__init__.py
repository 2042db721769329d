"""The seam for results: every place a committed batch of records goes is a `Sink`.

The line hands each commit (a scored batch, a rolling answer, a group of failures) to its
sinks in one fixed order. The order is what makes a crash safe, and it is stated here only:

1. `visuals`: overlays and masks, which the records point to, exist before any record does;
2. `journal`: results.jsonl, the single source of truth, one fsync'd write per commit;
3. `table`: results.csv, derived from the journal (rebuilt from it at every start);
4. `manifest`: the batch's manifest.json, repaired from the journal at start;
5. then every extra sink asked for (`--sink NAME`), in the order given.

Whatever the journal lacks after a crash is scored again and rewritten by every sink;
whatever it holds is never scored again. A new sink is one module with a class that has
`commit`, `flush` and `close`, registered with `@register_sink("name")`; `Line` needs no edit.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from musc_edge.errors import UsageError
from musc_edge.runtime.record import ResultRecord

if TYPE_CHECKING:
    from musc_edge.runtime.journal import Journal
    from musc_edge.runtime.scoring import Answer

CRASH_SAFE_ORDER = ("visuals", "journal", "table", "manifest")


@dataclass
class CommitContext:
    """What a commit is besides its records: the batch, and the maps of the scored images."""

    batch: int
    answers: Mapping[str, Answer] = field(default_factory=dict)  # by file, scored images only
    batch_ms: float | None = None  # last image ready -> committed, for scored batches


@dataclass
class SinkSetup:
    """What a sink factory may use: the out folder, the journal (recovered) and run facts."""

    out_dir: Path
    journal: Journal
    run_info: dict[str, Any]


class Sink(Protocol):
    """Receives every commit of the line, in commit order."""

    def commit(self, records: Sequence[ResultRecord], context: CommitContext) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


SinkFactory = Callable[[SinkSetup], Sink]
SINKS: dict[str, SinkFactory] = {}
# built-in sinks live in these modules and register themselves when imported
_MODULES = {name: f"musc_edge.runtime.sinks.{name}" for name in CRASH_SAFE_ORDER}


def register_sink(name: str) -> Callable[[SinkFactory], SinkFactory]:
    """Decorator: make a sink factory (a class taking a `SinkSetup`) available by name."""

    def add(factory: SinkFactory) -> SinkFactory:
        SINKS[name] = factory
        return factory

    return add


def sink_names(extra: Sequence[str] = ()) -> list[str]:
    """The crash-safe built-ins, then the extra sinks in the order given, each once."""
    names = list(CRASH_SAFE_ORDER)
    names += [name for name in dict.fromkeys(extra) if name not in names]
    return names


def open_sinks(setup: SinkSetup, extra: Sequence[str] = ()) -> list[Sink]:
    """Instantiate the built-in sinks and the extra ones, in the order they are called."""
    for module in _MODULES.values():
        importlib.import_module(module)
    unknown = [name for name in extra if name not in SINKS]
    if unknown:
        raise UsageError(f"unknown sink {', '.join(unknown)}; registered sinks: {', '.join(SINKS)}")
    return [SINKS[name](setup) for name in sink_names(extra)]
