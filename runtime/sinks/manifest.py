"""The `manifest` sink: batches/NNNNNN/manifest.json, the run settings and every record of
the batch, rewritten atomically at each commit to that batch.

A crash between a journal commit and its manifest leaves the manifest behind the journal; at
start the last batch's manifest is rewritten from the journal.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from musc_edge.files import write_json_atomic
from musc_edge.runtime.outputs import batch_dir
from musc_edge.runtime.record import ResultRecord
from musc_edge.runtime.sinks import CommitContext, SinkSetup, register_sink

MANIFEST_FILE = "manifest.json"


def read_manifest(path: Path) -> dict:
    return json.loads(path.read_text())


@register_sink("manifest")
class ManifestSink:
    def __init__(self, setup: SinkSetup) -> None:
        self.out_dir = setup.out_dir
        self.journal = setup.journal
        self.run_info = setup.run_info
        records = self.journal.last_batch_records
        path = self.path(self.journal.last_batch)
        if records and (not path.is_file() or len(read_manifest(path)["files"]) < len(records)):
            self.write(self.journal.last_batch, None)

    def path(self, batch: int) -> Path:
        return batch_dir(self.out_dir, batch) / MANIFEST_FILE

    def commit(self, records: Sequence[ResultRecord], context: CommitContext) -> None:
        self.write(context.batch, context.batch_ms)

    def write(self, batch: int, batch_ms: float | None) -> None:
        """The manifest of `batch` from the journal's records of it (the last batch)."""
        records = self.journal.last_batch_records
        summary = {
            "batch": batch,
            **self.run_info,
            "scored": sum(1 for r in records if r.error is None),
            "failed": sum(1 for r in records if r.error is not None),
            "batch_latency_ms": None if batch_ms is None else round(batch_ms, 2),
            "files": [record.to_dict() for record in records],
        }
        write_json_atomic(self.path(batch), summary)

    def flush(self) -> None:
        """Each manifest is complete when written."""

    def close(self) -> None:
        """Nothing is held open."""
