"""One-line messages for the errors a user can fix, instead of tracebacks.

A `MuscEdgeError` (or an `OSError`: a full disk, a missing folder) is printed as one
`error: ...` line on stderr, whatever the terminal width, so a log can be grepped for it;
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import typer

from musc_edge.errors import MuscEdgeError

USER_ERRORS = (MuscEdgeError, OSError)


def one_line(message: str) -> str:
    """The message with every run of whitespace (newlines included) folded to one space."""
    return " ".join(message.split())


def print_error(message: str) -> None:
    sys.stderr.write(f"error: {one_line(message)}\n")
    sys.stderr.flush()


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn user errors into one 'error: ...' line and exit status 2."""
    try:
        yield
    except USER_ERRORS as error:
        print_error(str(error))
        raise typer.Exit(2) from None
