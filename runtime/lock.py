"""One run per out folder: an advisory lock the kernel drops when its holder dies.

Two runs on one out folder would both score every file and overwrite each other's batches.
`flock` on OUT/.musc-edge.lock is released by the kernel when the holding process exits in
any way, SIGKILL and power loss included, so a stale lock never blocks a restart; the file
says who holds it, so the refusal can name the holder.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

from musc_edge.errors import MuscEdgeError

LOCK_FILE = ".musc-edge.lock"


class OutFolderBusy(MuscEdgeError):
    """Another run holds the out folder."""


class OutFolderLock:
    """Held from construction until `release` (or the process's end)."""

    def __init__(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / LOCK_FILE
        self.handle = open(self.path, "a+")  # noqa: SIM115  (held open while the lock is)
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            self.handle.close()
            raise OutFolderBusy(
                f"{out_dir} is in use by another musc-edge run ({holder}); stop it or choose "
                "another --out folder"
            ) from None
        self.handle.seek(0)
        self.handle.truncate()
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        self.handle.write(json.dumps(holder))
        self.handle.flush()

    def _holder(self) -> str:
        self.handle.seek(0)
        try:
            holder = json.loads(self.handle.read())
            return f"pid {holder['pid']} on {holder['host']} since {holder['since']}"
        except (ValueError, KeyError, TypeError):
            return "holder unknown"

    def release(self) -> None:
        if not self.handle.closed:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
