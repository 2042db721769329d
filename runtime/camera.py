"""The camera folder: which files are complete images, in the order they arrived.

Another program writes into the folder, often slowly or in pieces. A file is taken only once
its size, mtime and ctime have not changed for `settle` seconds and it decodes; one that still
does not decode `decode_timeout` seconds after its last change is handed on as a failure, so
the line records it instead of waiting forever. Temporary and hidden files are never looked at.

What is opened at all (docs/runtime.md, "Which files are taken"): only regular files, and only
those that lie inside the camera folder. A symbolic link is followed when its target is a
regular file inside the folder; a link that leads outside it, a FIFO, a device or a socket is
recorded as refused without being opened, and nothing of it is copied anywhere. A file larger
than `max_bytes` or declaring more than `max_pixels` is refused before it is decoded.

The folder itself is looked up at every scan, so a camera path that is a link repointed by a
daily rotation is followed, and one that vanishes is reported (`problem`) and taken up again
when it returns. A subfolder that cannot be listed is handed on as a failure of its own, so it
is recorded instead of skipped. Paths matching an `ignore` pattern (an archive subfolder, say)
are never looked at.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from musc_edge.files import file_sha256
from musc_edge.images import (
    DEFAULT_MAX_PIXELS,
    ImageReadError,
    is_image_name,
    probe_image,
    read_image,
)
from musc_edge.runtime.record import Key

DEFAULT_MAX_BYTES = 512 * 2**20  # no camera image is larger; reading is bounded by it
log = logging.getLogger(__name__)


@dataclass
class Arrival:
    """A complete image (image set) or a file that never became one (error set)."""

    path: Path
    key: Key
    ready_at: float  # monotonic time it was found complete
    sha256: str | None = None
    image: np.ndarray | None = None
    shape: tuple[int, int] | None = None  # the file's own (H, W), also when decoded reduced
    error: str | None = None
    note: str | None = None  # something about a scored file the record should say
    copyable: bool = False  # a regular file inside the camera folder: may go to rejected/

    @property
    def file(self) -> str:
        return self.key[0]


@dataclass
class _Watched:
    key: Key
    since: float  # monotonic time this size, mtime and ctime were first seen
    failure: str | None = None  # why this state did not decode
    refused: bool = False  # never to be opened: the failure is final at once


def refusal(path: Path, info: os.stat_result, root: Path, max_bytes: int) -> str | None:
    """Why a file must not be opened (the rules in the module docstring), or None."""
    if path.is_symlink():
        target = Path(os.path.realpath(path))
        if not target.is_relative_to(root):
            return f"{path}: a symbolic link to {target}, outside the camera folder; not read"
    if not stat.S_ISREG(info.st_mode):
        kind = "FIFO" if stat.S_ISFIFO(info.st_mode) else "device, socket or folder"
        return f"{path}: not a regular file ({kind}); not read"
    if info.st_size > max_bytes:
        return f"{path}: {info.st_size} bytes, above the limit of {max_bytes}; not read"
    return None


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
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        answered_content: set[tuple[str, str]] | None = None,
        ignore: tuple[str, ...] = (),
        full_resolution: bool = False,  # a region cuts the part out: no reduced decoding
    ) -> None:
        self.given = Path(root).absolute()
        self.full_resolution = full_resolution
        self.root = self.given.resolve()
        self.problem: str | None = None  # why the folder cannot be watched now, or None
        self.ignore = ignore
        self.unreadable: dict[Path, str] = {}  # subfolders the last scan could not list
        self.answered = answered
        self.answered_content = answered_content if answered_content is not None else set()
        self.settle = settle
        self.decode_timeout = decode_timeout
        self.exclude = exclude.resolve() if exclude else None
        self.clock = clock
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
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
        if not self._find_root():
            self.watched.clear()  # they vanished with the folder; found again when it returns
            return
        present = set()
        self.unreadable.clear()
        for path in self._files():
            try:
                info = path.stat()  # follows a link; a dangling one is gone
            except OSError:
                continue
            key = (self.relative(path), info.st_size, info.st_mtime_ns, info.st_ctime_ns)
            if key in self.answered:
                continue
            present.add(path)
            old = self.watched.get(path)
            if old is None or old.key != key:
                refused = refusal(path, info, self.root, self.max_bytes)
                self.watched[path] = _Watched(key, now, refused, refused is not None)
        for folder, why in self.unreadable.items():
            with contextlib.suppress(OSError):
                info = folder.stat()
                key = (self.relative(folder), 0, info.st_mtime_ns, info.st_ctime_ns)
                if key not in self.answered:
                    present.add(folder)
                    if folder not in self.watched:
                        self.watched[folder] = _Watched(key, now, why, refused=True)
        for path in set(self.watched) - present:
            del self.watched[path]

    def _find_root(self) -> bool:
        """Look the folder up again (a link may have been repointed); False while it is gone."""
        root = Path(os.path.realpath(self.given))
        if not root.is_dir() or not os.access(root, os.R_OK | os.X_OK):
            self.problem = (
                f"camera folder {self.given} is missing or cannot be read; waiting for it to return"
            )
            return False
        if root != self.root:
            log.warning("camera folder %s now leads to %s; watching that", self.given, root)
            self.root = root
        self.problem = None
        return True

    def take(self, limit: int) -> list[Arrival]:
        """Up to `limit` settled files in arrival order, each decoded or timed out."""
        now = self.clock()
        settled = sorted(
            (state.key[2], path)
            for path, state in self.watched.items()
            if state.refused or now - state.since >= self.settle
        )
        arrivals = []
        for _, path in settled:
            if len(arrivals) == limit:
                break
            state = self.watched[path]
            if state.refused:
                arrivals.append(self._hand_out(path, state, now, error=state.failure))
                continue
            if state.failure is None:
                arrival = self._load(path, state, now)
                if arrival is not None:
                    arrivals.append(arrival)
                    continue
            if state.failure is not None and now - state.since >= self.decode_timeout:
                copy = {"copyable": not path.is_symlink()}
                arrivals.append(self._hand_out(path, state, now, error=state.failure, **copy))
        return arrivals

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _files(self) -> Iterator[Path]:
        def unreadable(error: OSError) -> None:
            folder = Path(error.filename)
            if folder != self.root:  # the root itself is `problem`'s business
                why = error.strerror or type(error).__name__
                self.unreadable[folder] = (
                    f"{folder}: folder cannot be read ({why}); its files are not scored until "
                    "the service user can read it"
                )

        # never descends into links
        for folder, subfolders, names in os.walk(self.root, onerror=unreadable):
            subfolders[:] = sorted(
                name
                for name in subfolders
                if not name.startswith(".")
                and not self._ignored(Path(folder, name))
                and (self.exclude is None or Path(folder, name).resolve() != self.exclude)
            )
            yield from (
                Path(folder, name)
                for name in names
                if is_image_name(name) and not self._ignored(Path(folder, name))
            )

    def _ignored(self, path: Path) -> bool:
        """Whether the path relative to the folder matches an `ignore` pattern."""
        relative = self.relative(path)
        return any(fnmatch.fnmatchcase(relative, pattern) for pattern in self.ignore)

    def _load(self, path: Path, state: _Watched, now: float) -> Arrival | None:
        """Hash and decode; None if it does not decode (yet), changed while being read, or
        holds content already answered under this name."""
        try:
            digest = file_sha256(path)
            header = probe_image(path)
            image = read_image(path, self.max_pixels, header, self.full_resolution)
            info = path.stat()
        except OSError as error:
            state.failure = f"{path}: cannot read ({error.strerror})"
            return None
        except ImageReadError as error:
            state.failure = str(error)
            return None
        key = (state.key[0], info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        if key != state.key:
            self.watched[path] = _Watched(key, now)
            return None
        if (key[0], digest) in self.answered_content:  # only its metadata changed
            del self.watched[path]
            self.answered.add(key)
            return None
        note = None
        if header.frames > 1:
            note = f"{header.format} file of {header.frames} pages: page 1 was scored"
        found = {"sha256": digest, "image": image, "note": note}
        return self._hand_out(path, state, now, shape=(header.height, header.width), **found)

    def _hand_out(self, path: Path, state: _Watched, now: float, **found) -> Arrival:
        del self.watched[path]
        self.answered.add(state.key)
        self.handed_out += 1
        if "sha256" not in found and found.get("copyable"):
            with contextlib.suppress(OSError):  # unreadable: the error already says so
                found["sha256"] = file_sha256(path)
        return Arrival(path, state.key, now, **found)
