"""File helpers every part shares: atomic writes, so that a reader (the next run, a watching
program) sees the old file or the new one, never half of one, whenever the writer is killed;
and streamed sha256 digests, so that large artifacts are never held in memory to hash them."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write to a hidden temporary name beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    if isinstance(data, str):
        partial.write_text(data, encoding="utf-8")
    else:
        partial.write_bytes(data)
    os.replace(partial, path)


def write_json_atomic(path: Path, payload: dict) -> None:
    write_atomic(path, json.dumps(payload, indent=2))


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
