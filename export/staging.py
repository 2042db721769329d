"""Build a folder beside its final place and rename it there only once it is complete.

A crash or Ctrl-C during a long export then leaves either the old package or the new one,
never half of one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from musc_edge.package import MANIFEST


def check_replaceable(target: Path, force: bool) -> None:
    """Refuse to overwrite without force, and never replace something that is no package."""
    if not target.exists():
        return
    if not force:
        raise FileExistsError(f"{target} already exists; pass --force to replace it")
    if not target.is_dir() or not ((target / MANIFEST).is_file() or not any(target.iterdir())):
        raise FileExistsError(f"{target} exists and is not a model package; not replacing it")


@contextlib.contextmanager
def staged_folder(target: Path, force: bool) -> Iterator[Path]:
    """Yield a hidden temporary sibling of `target`; on success it becomes `target`.

    On any exception (KeyboardInterrupt included) the sibling is removed and an existing
    `target` is left untouched.
    """
    check_replaceable(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{secrets.token_hex(4)}.partial")
    staging.mkdir()  # not tempfile.mkdtemp: its 0700 mode would stay on the package
    try:
        yield staging
        check_replaceable(target, force)  # something may have appeared there meanwhile
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename staging to target; an old target is set aside first, restored on failure."""
    if not target.exists():
        os.rename(staging, target)
        return
    retired = target.with_name(f".{target.name}.{os.getpid()}.old")
    os.rename(target, retired)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(retired, target)
        raise
    shutil.rmtree(retired, ignore_errors=True)
