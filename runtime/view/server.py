"""The live view's web server: one page, its event stream, JSON, metrics and the overlays.

One background task polls the out folder for every client; each event stream only waits for
the next change. `serve` runs it in a daemon thread beside the line, so the line keeps its own
signal handling, and binds the socket itself so a port in use is a one-line error.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from musc_edge.errors import UsageError
from musc_edge.runtime.addresses import is_loopback
from musc_edge.runtime.view.metrics import CONTENT_TYPE, prometheus_text
from musc_edge.runtime.view.state import OutFolderView

POLL_S = 0.25  # how often the out folder is polled for new lines
HEARTBEAT_S = 15.0  # an event stream with nothing new sends a comment this often
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
PAGE = Path(__file__).with_name("page.html")
FILES_ROOT = "batches"  # the only folder /files serves from: overlays and masks

log = logging.getLogger(__name__)


class Hub:
    """The out folder's state for every client: polled once, pushed to each stream."""

    def __init__(self, out_dir: Path) -> None:
        self.view = OutFolderView(out_dir)
        self.payload = ""  # the newest snapshot as JSON
        self.version = 0
        self.clients = 0
        self.closed = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._changed = asyncio.Event()

    def _refresh(self) -> str | None:
        """In a worker thread: the new snapshot's JSON if anything changed."""
        changed = self.view.poll()
        return json.dumps(self.view.snapshot()) if changed or not self.payload else None

    async def refresh(self) -> None:
        payload = await asyncio.to_thread(self._refresh)
        if payload is not None and payload != self.payload:
            self.payload, self.version = payload, self.version + 1
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()

    async def run(self) -> None:
        """Poll until closed; a failed poll is logged (once while it fails the same way) and
        the next one tried, so a passing problem does not end the view."""
        failure = None
        while not self.closed:
            await asyncio.sleep(0 if self.view.behind else POLL_S)
            try:
                await self.refresh()
            except Exception as error:
                if repr(error) != failure:
                    log.exception("live view: polling %s failed", self.view.out_dir)
                failure = repr(error)
            else:
                failure = None

    async def changed(self, timeout: float) -> bool:
        """Wait for the next snapshot; False when `timeout` passed without one."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def close(self) -> None:
        """End every event stream (so a shutdown does not wait for browsers to leave)."""
        self.closed = True
        self._changed.set()

    def close_soon(self) -> None:
        """`close` from another thread."""
        if self.loop is not None and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop stopped meanwhile
                self.loop.call_soon_threadsafe(self.close)

    async def stream(self) -> AsyncIterator[str]:
        """Server-sent events: the state now, then every change, and a heartbeat comment."""
        self.clients += 1
        try:
            yield "retry: 2000\n\n"
            version = -1
            while not self.closed:
                if version != self.version:
                    version = self.version
                    yield f"data: {self.payload}\n\n"
                elif not await self.changed(HEARTBEAT_S):
                    yield ": heartbeat\n\n"
        finally:
            self.clients -= 1


def served_file(out_dir: Path, path: str) -> Path | None:
    """The overlay or mask PNG at `path` (relative to the out folder), or None for anything
    outside OUT/batches once resolved (`..`, absolute paths, links out) or not a PNG file."""
    root = (out_dir / FILES_ROOT).resolve()
    try:
        target = (out_dir / path).resolve()
    except (OSError, ValueError):  # a NUL byte, a link loop
        return None
    png = target.suffix.lower() == ".png" and target.is_file()
    return target if png and target.is_relative_to(root) else None


def create_app(out_dir: Path) -> Starlette:
    """The view of one out folder as an ASGI app (its lifespan runs the poller)."""
    hub = Hub(out_dir)
    page = PAGE.read_text()
    no_store = {"Cache-Control": "no-store"}

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers=no_store)

    async def events(request: Request) -> Response:
        headers = {**no_store, "X-Accel-Buffering": "no"}
        return StreamingResponse(hub.stream(), media_type="text/event-stream", headers=headers)

    async def state(request: Request) -> Response:
        return Response(hub.payload, media_type="application/json", headers=no_store)

    async def metrics(request: Request) -> Response:
        text = prometheus_text(json.loads(hub.payload))
        return PlainTextResponse(text, media_type=CONTENT_TYPE, headers=no_store)

    async def healthz(request: Request) -> Response:
        snapshot = json.loads(hub.payload)
        health = snapshot["health"] or {}
        body = {
            "status": health.get("status", "ok"),
            "problems": health.get("problems", {}),
            "last_record_at": snapshot["last_record_at"],
            "records": snapshot["records"],
            "clients": hub.clients,
        }
        # a line that cannot see its camera is not healthy: monitoring should say so
        return JSONResponse(body, 200 if body["status"] == "ok" else 503, headers=no_store)

    async def files(request: Request) -> Response:
        target = served_file(out_dir, request.path_params["path"])
        if target is None:
            return PlainTextResponse("not found", status_code=404)
        return FileResponse(target, media_type="image/png")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        hub.loop = asyncio.get_running_loop()
        await hub.refresh()  # the first request sees the journal (a long one: its start)
        poller = asyncio.create_task(hub.run())
        try:
            yield
        finally:
            hub.close()
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/events", events),
            Route("/api/state", state),
            Route("/metrics", metrics),
            Route("/healthz", healthz),
            Route("/files/{path:path}", files),
        ],
        lifespan=lifespan,
    )
    app.state.hub = hub
    return app


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: any free one), or a UsageError saying why not."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise UsageError(f"cannot serve the live view on {host}: {error.strerror}") from None
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise UsageError(
                f"port {port} on {host} is in use; choose another port for the live view"
            ) from None
        raise UsageError(f"cannot serve the live view on {host}:{port}: {error.strerror}") from None
    return sock


class _ThreadServer(uvicorn.Server):
    """uvicorn without its signal handlers: Ctrl-C and SIGTERM stay the line's."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ViewServer:
    """A running live view: its `url`, and `stop()` (also on leaving a `with` block)."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread, hub: Hub, url: str):
        self._server = server
        self._thread = thread
        self._hub = hub
        self.url = url

    def stop(self) -> None:
        """Close the event streams, shut the server down and wait for its thread."""
        self._hub.close_soon()
        self._server.should_exit = True
        self._thread.join(STOP_TIMEOUT_S)

    def __enter__(self) -> ViewServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve(
    out_dir: Path, host: str = "127.0.0.1", port: int = 8765, allow_remote: bool = False
) -> ViewServer:
    """Serve the live view of `out_dir` from a daemon thread; returns once it listens.

    Only loopback addresses unless `allow_remote`: the page shows the line's images to
    whoever can reach it, without any login.
    """
    if not (allow_remote or is_loopback(host)):
        raise UsageError(
            f"the live view would be reachable from other machines on {host}; pass "
            "--allow-remote to serve on other interfaces"
        )
    sock = bind(host, port)
    app = create_app(out_dir)
    config = uvicorn.Config(
        app,
        log_config=None,  # the process's logging stays as it is
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=2,
    )
    server = _ThreadServer(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="musc-edge-view", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        server.should_exit = True
        sock.close()
        raise RuntimeError(f"the live view of {out_dir} did not start; see the log above")
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    return ViewServer(server, thread, app.state.hub, f"http://{shown}:{bound_port}/")
