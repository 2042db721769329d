"""The camera folder: which files are complete images, in the order they arrived.

Another program writes into the folder, often slowly or in pieces. A file is taken only once
its size and mtime have not changed for `settle` seconds and it decodes; one that still does
not decode `decode_timeout` seconds after its last change is handed on as a failure, so the
line records it instead of waiting forever. Temporary and hidden files are never looked at.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from musc_edge.files import file_sha256
from musc_edge.images import ImageReadError, is_image_name, read_image
from musc_edge.runtime.journal import Key


@dataclass
class Arrival:
    """A complete image (image set) or a file that never became one (error set)."""

    path: Path
    key: Key
    ready_at: float  # monotonic time it was found complete
    sha256: str | None = None
    image: np.ndarray | None = None
    error: str | None = None

    @property
    def file(self) -> str:
        return self.key[0]


@dataclass
class _Watched:
    size: int
    mtime_ns: int
    since: float  # monotonic time this size and mtime were first seen
    failure: str | None = None  # why this state did not decode


class CameraDir:
    """Polls a folder tree; `take` hands out complete files, each key only once."""

    def __init__(
        self,
        root: Path,
        answered: set[Key],
        settle: float = 1.0,
        decode_timeout: float = 10.0,
        exclude: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = Path(root)
        self.answered = answered
        self.settle = settle
        self.decode_timeout = decode_timeout
        self.exclude = exclude.resolve() if exclude else None
        self.clock = clock
        self.watched: dict[Path, _Watched] = {}
        self.handed_out = 0
        # half-written files are expected here; OpenCV's decoder complaints about them are not news
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)

    @property
    def pending(self) -> int:
        """Files seen and not yet handed out."""
        return len(self.watched)

    def scan(self) -> None:
        """Note new and changed files; forget those that vanished or were answered."""
        now = self.clock()
        present = set()
        for path in self._files():
            try:
                info = path.stat()
            except OSError:
                continue  # removed while listing
            key = (self.relative(path), info.st_size, info.st_mtime_ns)
            if key in self.answered:
                continue
            present.add(path)
            old = self.watched.get(path)
            if old is None or (old.size, old.mtime_ns) != key[1:]:
                self.watched[path] = _Watched(info.st_size, info.st_mtime_ns, now)
        for path in set(self.watched) - present:
            del self.watched[path]

    def take(self, limit: int) -> list[Arrival]:
        """Up to `limit` settled files in arrival order, each decoded or timed out."""
        now = self.clock()
        settled = sorted(
            (state.mtime_ns, path)
            for path, state in self.watched.items()
            if now - state.since >= self.settle
        )
        arrivals = []
        for _, path in settled:
            if len(arrivals) == limit:
                break
            state = self.watched[path]
            if state.failure is None:
                arrival = self._load(path, state, now)
                if arrival is not None:
                    arrivals.append(arrival)
                    continue
            if state.failure is not None and now - state.since >= self.decode_timeout:
                arrivals.append(self._hand_out(path, state, now, error=state.failure))
        return arrivals

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _files(self):
        for folder, subfolders, names in os.walk(self.root):
            subfolders[:] = sorted(
                name
                for name in subfolders
                if not name.startswith(".")
                and (self.exclude is None or Path(folder, name).resolve() != self.exclude)
            )
            yield from (Path(folder, name) for name in names if is_image_name(name))

    def _load(self, path: Path, state: _Watched, now: float) -> Arrival | None:
        """Hash and decode; None if it does not decode (yet) or changed while being read."""
        try:
            digest = file_sha256(path)
            image = read_image(path)
            info = path.stat()
        except OSError as error:
            state.failure = f"{path}: cannot read ({error.strerror})"
            return None
        except ImageReadError as error:
            state.failure = str(error)
            return None
        if (info.st_size, info.st_mtime_ns) != (state.size, state.mtime_ns):
            self.watched[path] = _Watched(info.st_size, info.st_mtime_ns, now)
            return None
        return self._hand_out(path, state, now, sha256=digest, image=image)

    def _hand_out(self, path: Path, state: _Watched, now: float, **found) -> Arrival:
        del self.watched[path]
        key = (self.relative(path), state.size, state.mtime_ns)
        self.answered.add(key)
        self.handed_out += 1
        if "sha256" not in found:
            with contextlib.suppress(OSError):  # unreadable: the error already says so
                found["sha256"] = file_sha256(path)
        return Arrival(path, key, now, **found)
