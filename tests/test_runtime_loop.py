"""The line loop on a stand-in backbone: every file answered once, whatever happens to it.

A small deterministic extractor (PooledColours in tests/helpers.py: pooled colours through a
fixed projection) replaces the ViT so these tests run in seconds; the real backbone runs in
test_runtime_line.py.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from musc_edge.bench.synthetic import part_image
from musc_edge.cli import app
from musc_edge.images import is_image_name
from musc_edge.musc import MuSc
from musc_edge.package import ONNX_FILE
from musc_edge.runtime.backends import LocalBackend
from musc_edge.runtime.camera import CameraDir
from musc_edge.runtime.journal import RESULTS_FILE, Journal, JournalError
from musc_edge.runtime.line import Line
from musc_edge.runtime.settings import LineSettings
from musc_edge.runtime.sinks.table import TABLE_FILE
from tests.helpers import SIZE, PooledColours, make_line, results, write_package, write_parts


@pytest.mark.parametrize("overlap", [False, True])
def test_each_file_gets_one_line_and_bad_ones_are_set_aside(tmp_path: Path, overlap: bool) -> None:
    camera = tmp_path / "camera"
    names = write_parts(camera, 9)
    (camera / "empty.png").write_bytes(b"")
    (camera / "notes.png").write_text("not an image")
    data = (camera / names[0]).read_bytes()
    (camera / "truncated.png").write_bytes(data[: len(data) // 2])
    gray16 = (cv2.imread(str(camera / names[1]), cv2.IMREAD_GRAYSCALE).astype(np.uint16)) * 257
    cv2.imwrite(str(camera / "gray16.png"), gray16)
    (camera / "sub").mkdir()
    rgba = cv2.cvtColor(cv2.imread(str(camera / names[2])), cv2.COLOR_BGR2BGRA)
    cv2.imwrite(str(camera / "sub" / "rgba.png"), rgba)
    for ignored in (".hidden.png", "part.png.tmp", "part.png.part", "x.crdownload", "a.png~"):
        (camera / ignored).write_bytes(data)
    (camera / ".cache").mkdir()
    (camera / ".cache" / "thumb.png").write_bytes(data)

    stats = make_line(tmp_path, decode_timeout=0.0, overlap=overlap).run()

    out = tmp_path / "out"
    lines = results(out)
    files = sorted(r["file"] for r in lines)
    expected = [*names, "empty.png", "gray16.png", "notes.png", "sub/rgba.png", "truncated.png"]
    assert files == sorted(expected)
    errors = {r["file"]: r for r in lines if r["error"]}
    assert sorted(errors) == ["empty.png", "notes.png", "truncated.png"]
    assert "empty file" in errors["empty.png"]["error"]
    for record in errors.values():
        assert (out / record["rejected"]).read_bytes() == (camera / record["file"]).read_bytes()
    scored = [r for r in lines if not r["error"]]
    assert all(0 <= r["score"] <= 1 and (out / r["overlay"]).is_file() for r in scored)
    assert (stats.counts.scored, stats.counts.failed) == (11, 3)
    assert {r["batch"] for r in scored} == {1, 2, 3}  # 4 + 4 + a final partial batch of 3
    manifest = json.loads((out / "batches" / "000003" / "manifest.json").read_text())
    assert manifest["scored"] == 3 and manifest["engine"] == "stand-in"
    table = (out / TABLE_FILE).read_text().splitlines()
    assert len(table) == 1 + len(lines)


def test_restart_drops_a_torn_line_and_rescores_that_commit_once(tmp_path: Path) -> None:
    camera = tmp_path / "camera"
    write_parts(camera, 8)
    make_line(tmp_path).run()
    out = tmp_path / "out"
    journal = out / RESULTS_FILE
    first = results(out)
    assert [r["commit"] for r in first] == [1] * 4 + [2] * 4
    # a crash in the middle of writing the second commit: one full line, then half of one
    text = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(text[:5]) + text[5][:40])
    (out / TABLE_FILE).unlink()
    write_parts(camera, 2, start=8)

    line = make_line(tmp_path)
    assert line.stats.resumed == 4 and line.stats.dropped == 2
    line.run()

    again = results(out)
    assert sorted(r["file"] for r in again) == sorted(p.name for p in camera.iterdir())
    assert again[:4] == first[:4]
    kept = json.loads((out / "batches" / "000001" / "manifest.json").read_text())
    assert kept["batch_latency_ms"] is not None  # complete: not rewritten at the restart
    assert len((out / TABLE_FILE).read_text().splitlines()) == 1 + 10


def test_a_file_rewritten_in_place_is_a_new_image(tmp_path: Path) -> None:
    camera = tmp_path / "camera"
    names = write_parts(camera, 5)
    make_line(tmp_path).run()
    (new,) = write_parts(camera, 1, start=7)
    (camera / new).replace(camera / names[0])
    make_line(tmp_path).run()
    assert [r["file"] for r in results(tmp_path / "out")].count(names[0]) == 2


@pytest.mark.parametrize("overlap", [False, True])
def test_stop_finishes_the_batch_in_hand(tmp_path: Path, overlap: bool) -> None:
    write_parts(tmp_path / "camera", 3)
    stop = threading.Event()
    line = make_line(tmp_path, watch=True, batch_size=10, overlap=overlap)
    line.on_update = lambda stats: stop.set() if line.scheduler.held else None
    stats = line.run(stop)
    assert stats.counts.scored == 3 and len(results(tmp_path / "out")) == 3


class SlowMuSc(MuSc):
    """MuSc that takes long enough for the loop to extract more images meanwhile, and notes
    how many files the line had taken when each batch's scoring ended."""

    def __init__(self) -> None:
        super().__init__()
        self.taken: list[int] = []
        self.line: Line | None = None

    def score_pooled(self, *args, **kwargs):
        time.sleep(0.3)
        result = super().score_pooled(*args, **kwargs)
        self.taken.append(self.line.camera.handed_out)
        return result


@pytest.mark.parametrize("overlap", [False, True])
def test_overlap_extracts_the_next_images_while_a_batch_is_scored(
    tmp_path: Path, overlap: bool
) -> None:
    write_parts(tmp_path / "camera", 10)
    package = write_package(tmp_path / "pkg", image_size=SIZE, layers=[1, 2])
    settings = LineSettings(
        tmp_path / "camera",
        tmp_path / "out",
        batch_size=4,
        settle=0.0,
        poll=0.01,
        watch=False,
        overlap=overlap,
    )
    musc = SlowMuSc()
    line = Line(settings, LocalBackend(package, PooledColours(package), musc))
    musc.line = line
    stats = line.run()

    records = results(tmp_path / "out")
    assert (
        stats.counts.scored == 10 and [r["batch"] for r in records] == [1] * 4 + [2] * 4 + [3] * 2
    )
    assert [r["file"] for r in records] == sorted(r["file"] for r in records)
    assert json.loads((tmp_path / "out" / "batches" / "000001" / "manifest.json").read_text())
    # inline, nothing is taken while a batch is scored; overlapped, the next batch is
    assert musc.taken == ([8, 10, 10] if overlap else [4, 8, 10])


def test_overlap_gives_the_same_scores_as_inline(tmp_path: Path) -> None:
    write_parts(tmp_path / "camera", 9)
    make_line(tmp_path, out_dir=tmp_path / "inline", overlap=False).run()
    make_line(tmp_path, out_dir=tmp_path / "overlap", overlap=True).run()
    inline, overlapped = results(tmp_path / "inline"), results(tmp_path / "overlap")
    assert len(inline) == 9
    keys = ("file", "batch", "score", "label")
    assert [[r[k] for k in keys] for r in inline] == [[r[k] for k in keys] for r in overlapped]


def test_rolling_holds_a_warm_up_group_then_answers_one_by_one(tmp_path: Path) -> None:
    write_parts(tmp_path / "camera", 9)
    make_line(tmp_path, mode="rolling", batch_size=6).run()
    lines = results(tmp_path / "out")
    assert [r["commit_lines"] for r in lines] == [5] * 5 + [1] * 4
    assert [r["batch"] for r in lines] == [1] * 6 + [2] * 3
    assert all(r["mode"] == "rolling" and r["score"] is not None for r in lines)


def test_camera_waits_for_files_to_settle_and_decode(tmp_path: Path) -> None:
    now = [0.0]
    camera = CameraDir(tmp_path, set(), settle=1.0, decode_timeout=5.0, clock=lambda: now[0])
    data = cv2.imencode(".png", part_image(64, np.random.default_rng(0), False))[1].tobytes()
    path = tmp_path / "a.png"
    path.write_bytes(data[:100])  # the writer has only started
    camera.scan()
    now[0] = 2.0
    assert camera.take(10) == [] and camera.pending == 1  # settled, but not decodable yet
    path.write_bytes(data)
    camera.scan()
    now[0] = 2.5
    assert camera.take(10) == []  # changed: settling again
    now[0] = 3.1
    (arrival,) = camera.take(10)
    assert arrival.error is None and arrival.image.shape == (64, 64, 3) and camera.pending == 0
    camera.scan()
    assert camera.pending == 0  # taken once, never again
    (tmp_path / "b.png").write_bytes(b"garbage")
    camera.scan()
    now[0] = 5.0
    assert camera.take(10) == []
    now[0] = 8.2
    (failure,) = camera.take(10)
    assert "not a decodable image" in failure.error and failure.sha256


@pytest.mark.parametrize(
    ("name", "taken"),
    [
        ("a.png", True),
        ("A.JPG", True),
        ("b.tiff", True),
        ("c.bmp", True),
        ("d.WEBP", True),
        (".a.png", False),
        ("~$a.png", False),
        ("a.png.tmp", False),
        ("a.png.part", False),
        ("a.partial", False),
        ("a.png.crdownload", False),
        ("a.png~", False),
        ("a.txt", False),
    ],
)
def test_candidate_names(name: str, taken: bool) -> None:
    assert is_image_name(name) is taken


def test_journal_refuses_a_damaged_middle_line(tmp_path: Path) -> None:
    write_parts(tmp_path / "camera", 4)
    make_line(tmp_path).run()
    journal = tmp_path / "out" / RESULTS_FILE
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text(lines[0] + "{oops\n" + "".join(lines[1:]))
    with pytest.raises(JournalError, match="line 2 is not valid JSON"):
        Journal(tmp_path / "out")


def test_cli_refuses_a_missing_or_damaged_model_with_exit_2(tmp_path: Path) -> None:
    (tmp_path / "camera").mkdir()
    runner = CliRunner()
    args = ["run", "--camera-dir", str(tmp_path / "camera"), "--once", "--model"]
    missing = runner.invoke(app, [*args, str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "run `musc-edge export` first" in missing.output
    package = write_package(tmp_path / "pkg")
    (tmp_path / "pkg" / ONNX_FILE).write_bytes(b"graph")
    package.record_artifact(ONNX_FILE)
    package.write()
    (tmp_path / "pkg" / ONNX_FILE).write_bytes(b"another graph")
    damaged = runner.invoke(app, [*args, str(tmp_path / "pkg")])
    assert damaged.exit_code == 2 and "does not match its sha256" in damaged.output
