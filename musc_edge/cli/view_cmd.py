"""`musc-edge view`: the live view of an out folder in the browser, until Ctrl-C."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import typer
from rich.console import Console

from musc_edge.cli.errors import user_errors
from musc_edge.errors import UsageError

console = Console(soft_wrap=True)  # the URL stays whole in logs, whatever the width


def view(
    out: Path = typer.Argument(..., help="Out folder of `musc-edge run` (running or finished)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to serve on."),
    port: int = typer.Option(
        8765, "--port", min=0, max=65535, help="Port to serve on (0: any free port)."
    ),
    allow_remote: bool = typer.Option(
        False, "--allow-remote", help="Allow a non-loopback --host (no login: anyone reaching it)."
    ),
) -> None:
    """Serve the live view of OUT: latest parts, score timeline, counts, /metrics.

    It only reads OUT, so it can follow a line running in another process. See docs/view.md.
    """
    from musc_edge.runtime.view import serve

    with user_errors():
        if not out.is_dir():
            raise UsageError(f"out folder {out} does not exist; pass the --out folder of a run")
        server = serve(out, host, port, allow_remote)
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda signum, frame: stop.set())
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    console.print(f"live view of {out} at {server.url} (Ctrl-C to stop)")
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
