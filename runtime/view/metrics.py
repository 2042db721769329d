"""The live view's state as Prometheus text (exposition format 0.0.4), for /metrics.

Drawn from the same snapshot the page gets, so a scrape and the page never disagree. A value
not known yet (no part scored, no threshold) is left out rather than sent as NaN.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from musc_edge.runtime.verdicts import ANOMALOUS, NORMAL, UNJUDGED
from musc_edge.runtime.view.state import epoch

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# the labels of the counts, as the line writes them
VERDICTS = (ANOMALOUS, NORMAL, UNJUDGED, "unlabelled")

Sample = tuple[Mapping[str, str], float | int | bool | None]


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def family(name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> list[str]:
    """HELP and TYPE lines, then one line per known sample."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        if value is None:
            continue
        tags = ",".join(f'{key}="{escape(text)}"' for key, text in labels.items())
        number = repr(value) if isinstance(value, float) else str(int(value))
        lines.append(f"{name}{{{tags}}} {number}" if tags else f"{name} {number}")
    return lines


def prometheus_text(state: Mapping[str, Any]) -> str:
    """Every metric of the view, from an `OutFolderView.snapshot()`."""
    counts = state["counts"]
    calibrated = state["calibrated"]
    health = state.get("health")
    single = [
        ("musc_records_total", "counter", "Lines in results.jsonl.", counts["seen"]),
        ("musc_failed_total", "counter", "Files that could not be scored.", counts["failed"]),
        (
            "musc_repeated_total",
            "counter",
            "Parts flagged as a defect repeating at one place.",
            counts["repeated"],
        ),
        (
            "musc_shift_commits_total",
            "counter",
            "Commits whose scores left the normal band.",
            counts["shift_commits"],
        ),
        ("musc_last_score", "gauge", "Score of the newest scored part.", state["last_score"]),
        ("musc_threshold", "gauge", "Threshold of the newest scored part.", state["threshold"]),
        (
            "musc_latency_ms",
            "gauge",
            "Median latency, file complete to line written, of the recent scored parts.",
            state["median_latency_ms"],
        ),
        (
            "musc_throughput_per_minute",
            "gauge",
            "Parts recorded per minute over the last minute of records.",
            state["throughput_per_minute"],
        ),
        (
            "musc_calibrated",
            "gauge",
            "1 if the newest verdicts come from known-good parts, 0 if uncalibrated.",
            None if calibrated is None else int(calibrated),
        ),
        ("musc_shift", "gauge", "1 if the newest scored commit shifted.", int(state["shift"])),
        (
            "musc_input_ok",
            "gauge",
            "1 if the line can watch its camera folder, 0 while it cannot (see /healthz).",
            None if health is None else int(health.get("status") == "ok"),
        ),
        (
            "musc_last_record_timestamp_seconds",
            "gauge",
            "When the newest line was recorded (Unix time).",
            epoch(state["last_record_at"]),
        ),
    ]
    lines = family(
        "musc_parts_total",
        "counter",
        "Scored parts by verdict (unlabelled: before any threshold was set; unjudged: "
        "nothing to compare with and no calibration).",
        [({"label": verdict}, counts[verdict]) for verdict in VERDICTS],
    )
    for name, kind, help_text, value in single:
        lines += family(name, kind, help_text, [({}, value)])
    lines += family(
        "musc_item_anomalous_total",
        "counter",
        "Anomalous verdicts per inspection item (a line with items; docs/runtime.md).",
        [({"item": item}, count) for item, count in counts.get("items_anomalous", {}).items()],
    )
    backlog = (state["backlog"] or {}).items()
    lines += family(
        "musc_sink_backlog",
        "gauge",
        "Messages waiting in a network sink's outbox.",
        [({"sink": sink}, count) for sink, count in backlog],
    )
    return "\n".join(lines) + "\n"
