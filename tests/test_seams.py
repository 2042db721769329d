"""The seams of the redesign: MSM's finishing step reached from every path, sinks plugged in
by registration, stored records validated, and errors printed on one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from musc_edge.bench.datasets import load_samples
from musc_edge.bench.evaluate import evaluate_category
from musc_edge.bench.stages import Pipeline, run_once
from musc_edge.cli import app
from musc_edge.images import Preprocess
from musc_edge.msm import finish
from musc_edge.musc import MuSc
from musc_edge.runtime.journal import RESULTS_FILE, Journal, JournalError
from musc_edge.runtime.sinks import CRASH_SAFE_ORDER, SINKS, register_sink, sink_names
from tests.helpers import PooledColours, make_line, write_parts

SHIFT = 1.0  # added to every patch score by the patched finishing step


@pytest.fixture
def shifted_finish(monkeypatch) -> list[int]:
    """Replace the finishing step in its one place; count the calls that reach it."""
    calls = []
    original = finish.band_scores

    def shifted(table: torch.Tensor, keep: int) -> torch.Tensor:
        calls.append(keep)
        return original(table, keep) + SHIFT

    monkeypatch.setattr(finish, "band_scores", shifted)
    return calls


def stand_in_extractor(batch: np.ndarray):
    return PooledColours(None)(batch)


def test_eval_reaches_the_finishing_step(shifted_finish, bottle_dir: Path) -> None:
    samples = load_samples("mvtec", bottle_dir.parent, "bottle")[::10]
    preprocess = Preprocess(56, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    report = evaluate_category("bottle", samples, preprocess, stand_in_extractor, MuSc())
    assert shifted_finish
    assert min(image["raw_score"] for image in report.images) >= SHIFT


@pytest.mark.parametrize("mode", ["batch", "rolling"])
def test_run_reaches_the_finishing_step(shifted_finish, tmp_path: Path, mode: str) -> None:
    write_parts(tmp_path / "camera", 8)
    make_line(tmp_path, mode=mode).run()
    records = list(Journal(tmp_path / "out").records())
    assert shifted_finish and len(records) == 8
    assert min(record.raw_score for record in records) >= SHIFT


def test_bench_reaches_the_finishing_step(shifted_finish, tmp_path: Path) -> None:
    write_parts(tmp_path / "images", 6)
    paths = sorted((tmp_path / "images").iterdir())
    preprocess = Preprocess(56, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    output = run_once(Pipeline("ours", preprocess, stand_in_extractor, MuSc()), paths, tmp_path)
    assert shifted_finish
    assert output.patch_maps.min() >= SHIFT


class ToySink:
    """Keeps what it is given, as an MQTT or webhook sink would send it."""

    received: ClassVar[list[dict]] = []
    closed = False

    def __init__(self, setup) -> None:
        self.out_dir = setup.out_dir

    def commit(self, records, context) -> None:
        ToySink.received += [record.to_dict() for record in records]

    def flush(self) -> None:
        pass

    def close(self) -> None:
        ToySink.closed = True


@pytest.mark.slow
def test_a_registered_sink_receives_every_record_of_run_once(
    tmp_path: Path, vits14_package: Path, bottle_dir: Path, monkeypatch
) -> None:
    monkeypatch.setitem(SINKS, "toy", ToySink)
    ToySink.received, ToySink.closed = [], False
    camera = tmp_path / "camera"
    camera.mkdir()
    for image in sorted((bottle_dir / "test" / "good").glob("*.png"))[:6]:
        shutil.copyfile(image, camera / image.name)
    (camera / "broken.png").write_bytes(b"not a png")
    args = ["run", "--camera-dir", str(camera), "--model", str(vits14_package), "--once"]
    fast = ["--settle", "0", "--decode-timeout", "0", "--engine", "onnxruntime"]
    result = CliRunner().invoke(
        app, [*args, *fast, "--out", str(tmp_path / "out"), "--sink", "toy"]
    )
    assert result.exit_code == 0, result.output
    journal = [json.loads(line) for line in (tmp_path / "out" / RESULTS_FILE).open()]
    assert len(journal) == 7
    assert ToySink.received == journal and ToySink.closed


def test_sinks_run_in_the_crash_safe_order_then_the_extras() -> None:
    assert CRASH_SAFE_ORDER == ("visuals", "journal", "table", "manifest")
    assert sink_names(["toy", "journal", "toy"]) == [*CRASH_SAFE_ORDER, "toy"]


def test_an_unknown_sink_is_refused_naming_the_known_ones(tmp_path: Path) -> None:
    write_parts(tmp_path / "camera", 2)
    with pytest.raises(ValueError, match=r"unknown sink nosuch; registered sinks: .*visuals"):
        make_line(tmp_path, sinks={"nosuch": {}})


def test_register_sink_adds_to_the_registry(monkeypatch) -> None:
    monkeypatch.setattr("musc_edge.runtime.sinks.SINKS", dict(SINKS))
    from musc_edge.runtime import sinks

    register_sink("toy")(ToySink)
    assert sinks.SINKS["toy"] is ToySink


@pytest.mark.parametrize("line", ["{}", "42", '{"file": "a.png"}', "[1, 2]"])
def test_a_journal_line_that_is_json_but_no_record_is_refused(tmp_path: Path, line: str):
    write_parts(tmp_path / "camera", 4)
    make_line(tmp_path).run()
    journal = tmp_path / "out" / RESULTS_FILE
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text(lines[0] + line + "\n" + "".join(lines[1:]))
    with pytest.raises(JournalError, match="line 2 is not a result record"):
        Journal(tmp_path / "out")


def test_errors_are_one_line_whatever_the_terminal_width(tmp_path: Path, monkeypatch) -> None:
    deep = tmp_path.joinpath(*["a-rather-long-folder-name"] * 8) / "model"
    (tmp_path / "camera").mkdir()
    for width in ("40", "200"):
        monkeypatch.setenv("COLUMNS", width)
        args = ["run", "--camera-dir", str(tmp_path / "camera"), "--model", str(deep), "--once"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2
        (line,) = [text for text in result.output.splitlines() if text.startswith("error:")]
        assert line == f"error: model package {deep} not found; run `musc-edge export` first"
        usage = CliRunner().invoke(app, [*args, "--batch-size", "0"])
        assert usage.exit_code == 2
        assert "error: --batch-size: Input should be greater than or equal to 1" in usage.output
