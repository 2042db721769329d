"""`musc-edge bench sinks` against a real HTTP receiver, on the stand-in backbone: both arms
run, the sink's time is counted, and every record of every with-sinks run arrives once."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from musc_edge.cli import app
from tests.helpers import Receiver, write_package, write_parts


def bench_args(tmp_path: Path, *extra: str) -> list[str]:
    write_package(tmp_path / "pkg", weights_source="random-init", layers=[1, 2])
    return [
        *("bench", "sinks", "--model", str(tmp_path / "pkg"), "--images", str(tmp_path / "parts")),
        *("--engine", "torch", "--allow-random-init", "--batch-size", "3", *extra),
    ]


def test_bench_sinks_times_both_arms_and_delivers_every_record(tmp_path: Path) -> None:
    write_parts(tmp_path / "parts", 6)
    receiver = Receiver()
    try:
        args = bench_args(tmp_path, "--count", "6", "--runs", "1", "--json", str(tmp_path / "b"))
        result = CliRunner().invoke(app, [*args, "--sink", f"webhook:url={receiver.url}"])
    finally:
        receiver.close()
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b").read_text())
    assert report["sinks"] == {"webhook": {"url": receiver.url}}
    assert set(report["warmup"]) == set(report["runs"]) == {"plain", "sinks"}
    plain, sinks = report["runs"]["plain"][0], report["runs"]["sinks"][0]
    assert plain["images"] == sinks["images"] == 6
    assert plain["sink_commit_s"] == 0 and plain["backlog"] == {}
    assert sinks["sink_commit_s"] > 0 and sinks["backlog"] == {"webhook": 0}
    assert sinks["commit_s_by_sink"] == {"webhook": sinks["sink_commit_s"]}
    # the warm-up and the timed with-sinks run: 12 records, each delivered once
    ids = receiver.ids()
    assert len(ids) == len(set(ids)) == 12
    summary = report["summary"]
    ratio = summary["ratio"]["ms_per_image"]
    assert isinstance(ratio, float) and ratio > 0
    assert summary["pair_ratio"]["ms_per_image"]["median"] == ratio  # one pair: the same
    assert "sinks / plain" in result.output


def test_too_few_images_is_one_line(tmp_path: Path) -> None:
    write_parts(tmp_path / "parts", 2)
    args = bench_args(tmp_path, "--count", "3", "--sink", "webhook:url=http://127.0.0.1:9/r")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "holds 2 images; --count 3 needs that many" in result.output


def test_missing_images_folder_is_one_line(tmp_path: Path) -> None:
    args = bench_args(tmp_path, "--sink", "webhook:url=http://127.0.0.1:9/r")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert f"images folder {tmp_path / 'parts'} does not exist" in " ".join(result.output.split())
