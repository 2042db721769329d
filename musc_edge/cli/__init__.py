"""The `musc-edge` command line."""

from musc_edge.cli.app import app

__all__ = ["app"]
