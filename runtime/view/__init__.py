"""The live view of an out folder in the browser: `musc-edge view OUT`, `run --serve`.

It reads only what the line writes (results.jsonl, the batch manifests, overlays and masks),
so it can watch a running line from the same process or another one, or a finished folder.
"""

from musc_edge.runtime.view.server import ViewServer, create_app, serve

__all__ = ["ViewServer", "create_app", "serve"]
