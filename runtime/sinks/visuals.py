"""The `visuals` sink: heatmap overlays and binary masks of each scored image.

Written first in every commit (see the sink order), so a record never points to a file that
does not exist; written atomically, so a batch scored again after a crash overwrites its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from musc_edge.parallel import thread_map
from musc_edge.region import Region
from musc_edge.runtime.outputs import pixel_map
from musc_edge.runtime.record import ResultRecord
from musc_edge.runtime.scoring import PartAnswers
from musc_edge.runtime.sinks import CommitContext, SinkSetup, register_sink
from musc_edge.visualize import overlay, write_png


@register_sink("visuals")
class VisualsSink:
    def __init__(self, setup: SinkSetup) -> None:
        self.out_dir = setup.out_dir

    def commit(self, records: Sequence[ResultRecord], context: CommitContext) -> None:
        drawn = [r for r in records if r.overlay is not None and r.key[0] in context.answers]
        thread_map(lambda record: self._write(record, context.answers[record.key[0]]), drawn)

    def _write(self, record: ResultRecord, answers: PartAnswers) -> None:
        """The overlay of the item the verdict comes from; the mask of every item, each in its
        box of the file's own pixels and over its own threshold."""
        results = record.items or [None]
        worst = next(i for i, r in enumerate(results) if r is None or r.name == record.item)
        write_png(
            self.out_dir / record.overlay, overlay(answers[worst].item.preview, answers[worst].heat)
        )
        if record.mask is None:
            return
        mask = np.zeros(answers[0].item.shape, np.uint8)
        for answer, result in zip(answers, results, strict=True):
            threshold = record.threshold if result is None else result.threshold
            if threshold is not None:
                box = answer.item.region or Region(0, 0, mask.shape[1], mask.shape[0])
                shape = (box.height, box.width)
                box.crop(mask)[:] = (pixel_map(answer.patch_map, shape) > threshold) * 255
        write_png(self.out_dir / record.mask, mask)

    def flush(self) -> None:
        """Every file is complete when `commit` returns."""

    def close(self) -> None:
        """Nothing is held open."""
