"""The tallies of result records, kept by one rule wherever they are shown.

The terminal (`LineStats`), the live view and the OPC UA server all count parts; each used to
have its own idea of what "failed" is. A record is *failed* when it carries an error (it was
never scored); every other record is *scored*, and its label says how it was judged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from musc_edge.runtime.verdicts import ANOMALOUS, NORMAL, UNJUDGED


@dataclass
class Counts:
    """Records by outcome; `shift_commits` counts each shifted commit once."""

    seen: int = 0  # every record, scored or failed
    scored: int = 0
    anomalous: int = 0
    normal: int = 0
    unlabelled: int = 0  # scored before any threshold could be set
    unjudged: int = 0  # nothing to compare with and no calibration: not passed, not failed
    failed: int = 0
    repeated: int = 0
    joined: int = 0  # joined the known-good references (--refresh-references)
    shift_commits: int = 0
    # a line with inspection items: anomalous verdicts per item (a part may have several)
    items_anomalous: dict[str, int] = field(default_factory=dict)
    _last_shift_commit: object = None

    def add(self, record: Mapping[str, Any]) -> None:
        """Count one record, as stored (a journal line, or `ResultRecord.to_dict()`)."""
        self.seen += 1
        if record.get("error") is not None or record.get("score") is None:
            self.failed += 1
            return
        self.scored += 1
        label = record.get("label")
        self.anomalous += label == ANOMALOUS
        self.normal += label == NORMAL
        self.unjudged += label == UNJUDGED
        self.unlabelled += label is None
        self.repeated += bool(record.get("repeated"))
        self.joined += bool(record.get("joined_references"))
        for item in record.get("items") or ():
            if item["label"] == ANOMALOUS:
                self.items_anomalous[item["name"]] = self.items_anomalous.get(item["name"], 0) + 1
        commit = record.get("commit")
        if record.get("shift") and commit != self._last_shift_commit:
            self.shift_commits += 1
            self._last_shift_commit = commit

    def to_dict(self) -> dict[str, Any]:
        return {
            name: dict(value) if isinstance(value, dict) else value
            for name, value in vars(self).items()
            if not name.startswith("_")
        }
