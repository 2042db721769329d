"""The `table` sink: results.csv, one row per record, derived from the journal.

At start it is rebuilt from the recovered journal, so it can never disagree with it; each
commit then appends its rows.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

from musc_edge.files import write_atomic
from musc_edge.runtime.record import TABLE_COLUMNS, ResultRecord, table_row
from musc_edge.runtime.sinks import CommitContext, SinkSetup, register_sink

TABLE_FILE = "results.csv"


@register_sink("table")
class TableSink:
    def __init__(self, setup: SinkSetup) -> None:
        self.path = setup.out_dir / TABLE_FILE
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(TABLE_COLUMNS)
        writer.writerows(table_row(record) for record in setup.journal.records())
        write_atomic(self.path, buffer.getvalue())

    def commit(self, records: Sequence[ResultRecord], context: CommitContext) -> None:
        with open(self.path, "a", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows(table_row(record) for record in records)

    def flush(self) -> None:
        """Each commit closes the file."""

    def close(self) -> None:
        """Nothing is held open."""
