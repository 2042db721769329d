"""The `visuals` sink: heatmap overlays and binary masks of each scored image.

Written first in every commit (see the sink order), so a record never points to a file that
does not exist; written atomically, so a batch scored again after a crash overwrites its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from musc_edge.parallel import thread_map
from musc_edge.runtime.outputs import pixel_map
from musc_edge.runtime.record import ResultRecord
from musc_edge.runtime.scoring import Answer
from musc_edge.runtime.sinks import CommitContext, SinkSetup, register_sink
from musc_edge.visualize import overlay, write_png


@register_sink("visuals")
class VisualsSink:
    def __init__(self, setup: SinkSetup) -> None:
        self.out_dir = setup.out_dir

    def commit(self, records: Sequence[ResultRecord], context: CommitContext) -> None:
        drawn = [r for r in records if r.overlay is not None and r.key[0] in context.answers]
        thread_map(lambda record: self._write(record, context.answers[record.key[0]]), drawn)

    def _write(self, record: ResultRecord, answer: Answer) -> None:
        item = answer.item
        write_png(self.out_dir / record.overlay, overlay(item.preview, answer.heat))
        if record.mask is not None:
            mask = pixel_map(answer.patch_map, item.shape) > record.threshold
            write_png(self.out_dir / record.mask, mask.astype(np.uint8) * 255)

    def flush(self) -> None:
        """Every file is complete when `commit` returns."""

    def close(self) -> None:
        """Nothing is held open."""
