"""The seam for results: every place a committed batch of records goes is a `Sink`.

The line hands each commit (a scored batch, a rolling answer, a group of failures) to its
sinks in one fixed order. The order is what makes a crash safe, and it is stated here only:

1. `visuals`: overlays and masks, which the records point to, exist before any record does;
2. `journal`: results.jsonl, the single source of truth, one fsync'd write per commit;
3. `table`: results.csv, derived from the journal (rebuilt from it at every start);
4. `manifest`: the batch's manifest.json, repaired from the journal at start;
5. then every extra sink asked for (`--sink NAME[:KEY=VALUE,...]` or the line config's
   `sinks:` section), in the order given.

Whatever the journal lacks after a crash is scored again and rewritten by every sink;
whatever it holds is never scored again. A new sink is one module with a class that has
`commit`, `flush` and `close`, registered with `@register_sink("name")`; `Line` needs no edit.
A sink with settings reads them from `SinkSetup.options` through `sink_options`, which checks
them against the sink's own pydantic model, so a typo is refused with the valid names.
Network sinks deliver through `musc_edge.runtime.sinks.outbox`, so an outage loses nothing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from musc_edge.errors import UsageError
from musc_edge.runtime.health import LineHealth
from musc_edge.runtime.record import ResultRecord

if TYPE_CHECKING:
    from musc_edge.runtime.journal import Journal
    from musc_edge.runtime.scoring import PartAnswers

CRASH_SAFE_ORDER = ("visuals", "journal", "table", "manifest")


@dataclass
class CommitContext:
    """What a commit is besides its records: the batch, and the maps of the scored images."""

    batch: int
    # by file, scored images only: one answer per inspection item (runtime/inspections.py)
    answers: Mapping[str, PartAnswers] = field(default_factory=dict)
    batch_ms: float | None = None  # last image ready -> committed, for scored batches


@dataclass
class SinkSetup:
    """What a sink factory may use: the out folder, the journal (recovered), run facts and
    the sink's own options (from `--sink NAME:KEY=VALUE` or the line config)."""

    out_dir: Path
    journal: Journal
    run_info: dict[str, Any]
    name: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)
    health: LineHealth = field(default_factory=LineHealth)  # problems with the line's input


class Sink(Protocol):
    """Receives every commit of the line, in commit order."""

    def commit(self, records: Sequence[ResultRecord], context: CommitContext) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


SinkFactory = Callable[[SinkSetup], Sink]
SinkSpecs = Mapping[str, Mapping[str, Any]]  # extra sinks by name -> their options, in order
Options = TypeVar("Options", bound=BaseModel)
SINKS: dict[str, SinkFactory] = {}
# built-in sinks live in modules of their own name and register themselves when imported;
# the optional ones (network protocols, the OPC UA server) are imported only when asked for,
# so the lean runtime does not need their libraries
OPTIONAL_SINKS = ("mqtt", "webhook", "opcua")
_MODULES = {name: f"musc_edge.runtime.sinks.{name}" for name in CRASH_SAFE_ORDER + OPTIONAL_SINKS}


def register_sink(name: str) -> Callable[[SinkFactory], SinkFactory]:
    """Decorator: make a sink factory (a class taking a `SinkSetup`) available by name."""

    def add(factory: SinkFactory) -> SinkFactory:
        SINKS[name] = factory
        return factory

    return add


def parse_sink_spec(text: str) -> tuple[str, dict[str, str]]:
    """`NAME` or `NAME:KEY=VALUE,KEY=VALUE` (the `--sink` form) -> name and raw options."""
    name, _, rest = text.partition(":")
    options: dict[str, str] = {}
    for pair in filter(None, (part.strip() for part in rest.split(","))):
        key, equals, value = pair.partition("=")
        if not equals or not key.strip():
            raise UsageError(f"--sink {text}: options are KEY=VALUE separated by commas")
        options[key.strip()] = value.strip()
    if not name.strip():
        raise UsageError(f"--sink {text!r}: the sink's name comes first (e.g. mqtt:host=broker)")
    return name.strip(), options


def sink_options(model: type[Options], setup: SinkSetup) -> Options:
    """The sink's options checked against its pydantic model: one line naming what is wrong."""
    try:
        return model.model_validate(dict(setup.options))
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(str(part) for part in problem["loc"]) or "options"
        known = ", ".join(model.model_fields)
        raise UsageError(
            f"sink {setup.name}: {where}: {problem['msg']} (its options: {known})"
        ) from None


def sink_names(extra: Sequence[str] = ()) -> list[str]:
    """The crash-safe built-ins, then the extra sinks in the order given, each once."""
    names = list(CRASH_SAFE_ORDER)
    names += [name for name in dict.fromkeys(extra) if name not in names]
    return names


def _import_builtin(name: str) -> None:
    """Register a built-in sink by importing its module; a missing extra is a one-line error."""
    if name in SINKS or name not in _MODULES:
        return
    try:
        importlib.import_module(_MODULES[name])
    except ModuleNotFoundError as error:
        if error.name and error.name.startswith("musc_edge"):
            raise
        raise UsageError(
            f"sink {name} needs the Python package {error.name}: pip install 'musc-edge[line]'"
        ) from None


def open_sinks(setup: SinkSetup, extra: SinkSpecs | Sequence[str] = ()) -> dict[str, Sink]:
    """Instantiate the built-in sinks and the extra ones, by name in the order they are called.

    If one fails to open, those already open are closed, so no thread or socket is left."""
    specs = extra if isinstance(extra, Mapping) else {name: {} for name in extra}
    for name in sink_names(list(specs)):
        _import_builtin(name)
    unknown = [name for name in specs if name not in SINKS]
    if unknown:
        raise UsageError(f"unknown sink {', '.join(unknown)}; registered sinks: {', '.join(SINKS)}")
    opened: dict[str, Sink] = {}
    try:
        for name in sink_names(list(specs)):
            options = specs.get(name, {})
            opened[name] = SINKS[name](replace(setup, name=name, options=options))
    except BaseException:
        for sink in reversed(opened.values()):
            sink.close()
        raise
    return opened
