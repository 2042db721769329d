"""Real receivers for the network sinks on this machine, for benchmarks and trials by hand:
a Mosquitto broker and an HTTP endpoint answering 200, each on a free loopback port, plus a
free port for the `opcua` sink's own server. Prints the `--sink` specs, runs until Ctrl-C.

    python tools/sink_receivers.py --specs /tmp/sinks.txt &
    musc-edge bench sinks --model PKG --images DIR $(sed 's/^/--sink /' /tmp/sinks.txt)

At exit it says how many webhook requests arrived and how many were repeats (by record id).
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import signal
import socket
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HOST = "127.0.0.1"


def free_port() -> int:
    """A port nothing listens on now (the OS's choice), so runs on a shared machine never clash."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def start_mosquitto(
    binary: str, folder: Path, port: int, persistent: bool = False
) -> subprocess.Popen:
    """Mosquitto on loopback with anonymous clients, as the current user (as root it would
    otherwise switch to the `mosquitto` user); returns once it accepts connections.
    `persistent`: queued QoS 1 messages survive a restart of the broker (saved in `folder`)."""
    config = folder / "mosquitto.conf"
    user = pwd.getpwuid(os.getuid()).pw_name
    keep = f"persistence true\npersistence_location {folder}/\n" if persistent else ""
    config.write_text(
        f"listener {port} {HOST}\nallow_anonymous true\nuser {user}\n{keep}"
        f"log_dest file {folder}/mosquitto.log\n"
    )
    process = subprocess.Popen([binary, "-c", str(config)])
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise SystemExit(f"mosquitto did not listen on {port}; see {folder}") from None
            time.sleep(0.05)


class Receiver:
    """An HTTP endpoint that answers 200 to every POST and counts record ids."""

    def __init__(self, port: int) -> None:
        self.ids: list[str] = []
        ids = self.ids

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                ids.append(json.loads(body or b"{}").get("id", ""))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass  # one line per request would cost the benchmark more than the request

        self.server = ThreadingHTTPServer((HOST, port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mosquitto", default="/usr/sbin/mosquitto", help="broker binary")
    parser.add_argument("--specs", type=Path, help="also write the --sink specs here, one a line")
    args = parser.parse_args()

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    mqtt_port, http_port, opcua_port = free_port(), free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="sink-receivers-") as folder:
        broker = start_mosquitto(args.mosquitto, Path(folder), mqtt_port)
        receiver = Receiver(http_port)
        specs = [
            f"mqtt:host={HOST},port={mqtt_port}",
            f"webhook:url=http://{HOST}:{http_port}/r",
            f"opcua:endpoint=opc.tcp://{HOST}:{opcua_port}/musc-edge/",
        ]
        if args.specs:
            args.specs.write_text("".join(f"{spec}\n" for spec in specs))
        print(" ".join(f"--sink {spec}" for spec in specs), flush=True)
        try:
            stop.wait()
        finally:
            receiver.close()
            broker.terminate()
            broker.wait(10)
    repeats = len(receiver.ids) - len(set(receiver.ids))
    print(f"webhook: {len(receiver.ids)} requests, {repeats} repeats", flush=True)


if __name__ == "__main__":
    main()
