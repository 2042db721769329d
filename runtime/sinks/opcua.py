"""The `opcua` sink: an OPC UA server a PLC reads the line's state from.

A PLC polls values rather than receiving messages, so this sink keeps a server of
read-only variables (state, heartbeat, the last answer, counts; docs/opcua.md) instead of
sending records. The asyncua server runs on its own event loop in a background thread; a
commit only hands the new values to that loop and returns. One task there writes every
update in commit order, VerdictSequence last, so a PLC that sees a new sequence number reads
the answer it counts. Counts start from the recovered journal, so a restart continues them.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import threading
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

from asyncua import Node, Server, ua
from pydantic import BaseModel, ConfigDict, Field

from musc_edge.errors import UsageError
from musc_edge.runtime.addresses import is_loopback
from musc_edge.runtime.counts import Counts
from musc_edge.runtime.record import ResultRecord
from musc_edge.runtime.sinks import CommitContext, SinkSetup, register_sink, sink_options

NAME_PATTERN = r"^[A-Za-z0-9_-]+$"  # no dots: they separate the parts of a NodeId
STARTING, RUNNING, STOPPED = "starting", "running", "stopped"
START_TIMEOUT_S = 60.0  # the server builds its standard address space first (about 1 s)
STOP_TIMEOUT_S = 10.0
# every variable of a station, in the order an update writes them: VerdictSequence last
VARIABLES = {
    "State": ua.VariantType.String,
    "Heartbeat": ua.VariantType.DateTime,
    "LastFile": ua.VariantType.String,
    "LastRecordId": ua.VariantType.String,
    "LastVerdict": ua.VariantType.String,
    "LastScore": ua.VariantType.Double,
    "Threshold": ua.VariantType.Double,
    "Calibrated": ua.VariantType.Boolean,
    "Shift": ua.VariantType.Boolean,
    "Repeated": ua.VariantType.Boolean,
    "PartCount": ua.VariantType.UInt64,
    "AnomalousCount": ua.VariantType.UInt64,
    "FailedCount": ua.VariantType.UInt64,
    "VerdictSequence": ua.VariantType.UInt64,
}


class OpcUaOptions(BaseModel):
    """`--sink opcua:KEY=VALUE,...` or the line config's `sinks: {opcua: {...}}`."""

    model_config = ConfigDict(extra="forbid")

    endpoint: str = "opc.tcp://127.0.0.1:4840/musc-edge/"
    namespace: str = Field("urn:musc-edge", min_length=1)
    line: str = Field("line1", pattern=NAME_PATTERN)
    station: str = Field("station1", pattern=NAME_PATTERN)
    heartbeat_s: float = Field(1.0, gt=0)
    allow_remote: bool = False  # listen beyond this machine: no encryption, anonymous clients


def node_id(line: str, station: str, variable: str | None = None) -> str:
    """The string identifier of a station's node (or of one of its variables), stable across
    restarts so a PLC configuration keeps working: `line1.station1.LastVerdict`."""
    return ".".join(filter(None, (line, station, variable)))


def listen_address(options: OpcUaOptions) -> tuple[str, int]:
    """Host and port of the endpoint; beyond loopback only with allow_remote, as the rest of
    the product binds to this machine unless told otherwise."""
    parts = urlsplit(options.endpoint)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "opc.tcp" or not parts.hostname or port is None:
        raise UsageError(
            f"sink opcua: endpoint {options.endpoint!r} is not opc.tcp://HOST:PORT/PATH "
            "(e.g. opc.tcp://127.0.0.1:4840/musc-edge/)"
        )
    if not (options.allow_remote or is_loopback(parts.hostname)):
        raise UsageError(
            f"sink opcua: endpoint host {parts.hostname} is reachable from other machines and "
            "the server has no encryption or login; set allow_remote=true to serve the line "
            "network anyway (docs/opcua.md)"
        )
    return parts.hostname, port


def _number(value: float | None) -> float:
    return math.nan if value is None else value


@dataclass
class Tally:
    """What the answer variables say; kept in the line's thread, sent whole with each update."""

    counts: Counts = field(default_factory=Counts)
    last: ResultRecord | None = None  # the last answer, scored or failed
    judged: ResultRecord | None = None  # the last scored one: the line's threshold

    def add(self, records: Iterable[ResultRecord]) -> None:
        for record in records:
            self.counts.add(record.to_dict())
            if record.error is None:
                self.judged = record
            self.last = record

    def values(self) -> dict[str, Any]:
        last, judged = self.last, self.judged
        return {
            "LastFile": last.file if last else "",
            "LastRecordId": last.record_id if last else "",
            "LastVerdict": _verdict(last),
            "LastScore": _number(last.score if last else None),
            "Threshold": _number(judged.threshold if judged else None),
            "Calibrated": bool(judged and judged.calibrated),
            "Shift": bool(last and last.shift),
            "Repeated": bool(last and last.repeated),
            "PartCount": self.counts.scored,
            "AnomalousCount": self.counts.anomalous,
            "FailedCount": self.counts.failed,
            "VerdictSequence": self.counts.seen,
        }


def _verdict(record: ResultRecord | None) -> str:
    if record is None:
        return ""
    if record.error:
        return "error"
    return record.label or "unknown"


def _quiet_asyncua() -> None:
    """asyncua logs a traceback of its own for a busy port, which the sink reports as one
    line; the rest of its log is for its developers. A logger the application set is kept."""
    logger = logging.getLogger("asyncua")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.CRITICAL)


@register_sink("opcua")
class OpcUaSink:
    """An OPC UA server of the line's state, serving from the factory until `close`."""

    def __init__(self, setup: SinkSetup) -> None:
        self.options = sink_options(OpcUaOptions, setup)
        self.host, self.port = listen_address(self.options)
        self.tally = Tally()
        self.tally.add(setup.journal.records())
        _quiet_asyncua()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="musc-edge opcua", daemon=True
        )
        self._thread.start()
        try:
            self._call(self._start(), START_TIMEOUT_S)
        except BaseException:
            self._end_loop()
            raise

    def _call(self, coroutine: Coroutine[Any, Any, None], timeout: float) -> None:
        """Run a step on the server's loop and wait for it (start and stop only)."""
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    async def _start(self) -> None:
        options = self.options
        self.server = Server()
        await self.server.init()
        self.server.set_endpoint(options.endpoint)
        self.server.set_server_name(f"musc-edge {options.line}/{options.station}")
        self.server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        self.server.set_identity_tokens([ua.AnonymousIdentityToken])  # no "admin" login
        self.server.allow_remote_admin(False)
        ns = await self.server.register_namespace(options.namespace)
        folder = await self.server.nodes.objects.add_folder(
            ua.NodeId("MuscEdge", ns), ua.QualifiedName("MuscEdge", ns)
        )
        line = await folder.add_folder(
            ua.NodeId(options.line, ns), ua.QualifiedName(options.line, ns)
        )
        station = await line.add_object(
            ua.NodeId(node_id(options.line, options.station), ns),
            ua.QualifiedName(options.station, ns),
        )
        initial = {"State": STARTING, "Heartbeat": datetime.now(timezone.utc)}
        initial |= self.tally.values()
        self.nodes: dict[str, Node] = {}
        for name, kind in VARIABLES.items():
            self.nodes[name] = await station.add_variable(  # read-only for clients
                ua.NodeId(node_id(options.line, options.station, name), ns),
                ua.QualifiedName(name, ns),
                ua.Variant(initial[name], kind),
            )
        try:
            await self.server.start()
        except OSError as error:
            busy = error.errno == errno.EADDRINUSE
            why = "is already in use (another run or OPC UA server?)" if busy else error.strerror
            raise UsageError(
                f"sink opcua: cannot listen on {self.host} port {self.port}: {why}; choose "
                "another port in endpoint"
            ) from None
        self._updates: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._publisher = asyncio.create_task(self._publish())

    async def _publish(self) -> None:
        """The one writer: updates in commit order, the heartbeat while running."""
        loop = asyncio.get_running_loop()
        beat = loop.time()
        update: dict[str, Any] | None = {"State": RUNNING}
        while update is not None:
            if loop.time() >= beat and update.get("State") != STOPPED:
                update = {"Heartbeat": datetime.now(timezone.utc), **update}
                beat = loop.time() + self.options.heartbeat_s
            for name, value in update.items():
                await self.nodes[name].write_value(value, VARIABLES[name])
            try:
                update = await asyncio.wait_for(self._updates.get(), beat - loop.time())
            except asyncio.TimeoutError:
                update = {}

    def commit(self, records: Sequence[ResultRecord], context: CommitContext) -> None:
        """Hand the new values to the server's loop; never waits for it."""
        if not records:
            return
        self.tally.add(records)
        self._loop.call_soon_threadsafe(self._updates.put_nowait, self.tally.values())

    def flush(self) -> None:
        """Every commit is handed over at once; `close` publishes what is still queued."""

    def close(self) -> None:
        """State becomes stopped and stays readable for one heartbeat (at most 1 s), so a PLC
        polling that often sees it; then the server stops and its port is free again."""
        if self._loop.is_closed():
            return
        try:
            self._call(self._stop(), STOP_TIMEOUT_S)
        finally:
            self._end_loop()

    async def _stop(self) -> None:
        self._updates.put_nowait({"State": STOPPED})
        self._updates.put_nowait(None)
        await self._publisher
        await asyncio.sleep(min(self.options.heartbeat_s, 1.0))
        await self.server.stop()

    def _end_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
