"""One-line messages for the errors a user can fix, instead of tracebacks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console
from rich.markup import escape

err_console = Console(stderr=True)


@contextlib.contextmanager
def user_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Turn the given exception kinds (plus ValueError, OSError) into 'error: ...' and exit 2."""
    try:
        yield
    except (ValueError, OSError, *kinds) as error:
        err_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False)
        raise typer.Exit(2) from None
