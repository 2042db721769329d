"""The live view: the journal tail, every endpoint through a real server, and the page in a
real browser following a real line as the camera writes parts.

The browser is Debian's chromium driven by Playwright. `MUSC_UPDATE_SCREENSHOT=1` runs the
browser test on real MVTec bottle images and writes the screenshot into docs/view.png.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from musc_edge.cli import app
from musc_edge.errors import UsageError
from musc_edge.musc import MuSc
from musc_edge.package import load_package
from musc_edge.runtime import sinks
from musc_edge.runtime.addresses import is_loopback
from musc_edge.runtime.backends import LocalBackend
from musc_edge.runtime.journal import RESULTS_FILE, Journal
from musc_edge.runtime.line import Line
from musc_edge.runtime.record import ResultRecord, Timings
from musc_edge.runtime.runners import open_runner
from musc_edge.runtime.settings import LineSettings
from musc_edge.runtime.view import ViewServer, serve
from musc_edge.runtime.view import server as view_server
from musc_edge.runtime.view import state as view_state
from musc_edge.runtime.view.metrics import prometheus_text
from musc_edge.runtime.view.state import JournalTail, OutFolderView, ViewState
from tests.conftest import BOTTLE, need
from tests.helpers import make_line, write_parts

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
UPDATE_SCREENSHOT = "MUSC_UPDATE_SCREENSHOT"
DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "view.png"
OVERLAY = "batches/000001/overlays/a_png.png"
# the browser test's line: rolling, so the first 5 parts are scored together, then each part
# on arrival; a file that does not decode is an error line after 0.3 s
LINE = {"watch": True, "mode": "rolling", "batch_size": 8, "decode_timeout": 0.3}


def record(file: str, score: float | None = 0.2, **fields) -> ResultRecord:
    """A journal record as the line writes it (scored unless `error` is given)."""
    defaults = {
        "label": None if score is None else "normal",
        "threshold": None if score is None else 0.5,
        "threshold_basis": "history",
        "timings": Timings(10.0, 20.0, 100.0),
    }
    return ResultRecord(file, 1, 1, 1, None, 1, "batch", score=score, **{**defaults, **fields})


def commit(out: Path, *records: ResultRecord) -> None:
    Journal(out).commit(list(records))


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """An out folder with 3 scored parts (one anomalous), a failure and one overlay."""
    out = tmp_path / "out"
    commit(
        out,
        record("a.png", 0.2, overlay=OVERLAY),
        record("b.png", 0.9, label="anomalous", repeated=True),
        record("c.png", 0.3),
    )
    commit(out, record("bad.png", None, error="not a decodable image header"))
    (out / OVERLAY).parent.mkdir(parents=True)
    cv2.imwrite(str(out / OVERLAY), np.full((8, 8, 3), 128, np.uint8))
    return out


@pytest.fixture
def view(out: Path) -> Iterator[ViewServer]:
    with serve(out, port=0) as server:
        yield server


def get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.headers["Content-Type"], response.read()


def raw_status(server: ViewServer, path: str) -> int:
    """The status for a path sent exactly as written (no client normalises `..` away)."""
    host, port = server.url.removeprefix("http://").strip("/").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


SAMPLE = re.compile(
    r'(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[a-zA-Z_]\w*="(?:[^"\\\n]|\\.)*"'
    r'(?:,[a-zA-Z_]\w*="(?:[^"\\\n]|\\.)*")*)\})? (?P<value>\S+)'
)


def parse_prometheus(text: str) -> dict[tuple[str, str], float]:
    """Samples by (name, labels), checking the text format: HELP and TYPE before samples."""
    assert text.endswith("\n")
    typed, samples = {}, {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge") and name not in typed
            typed[name] = kind
            continue
        match = SAMPLE.fullmatch(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        assert match["name"] in typed, f"{match['name']} has no TYPE line before it"
        if typed[match["name"]] == "counter":
            assert match["name"].endswith("_total")
        samples[match["name"], match["labels"] or ""] = float(match["value"])
    return samples


def test_tail_reads_complete_lines_and_picks_up_appended_ones(tmp_path: Path) -> None:
    path = tmp_path / RESULTS_FILE
    tail = JournalTail(path)
    assert tail.read() == ([], False)  # the line has not written anything yet
    lines = [json.dumps({"file": f"{n}.png", "commit": n}) + "\n" for n in range(4)]
    path.write_text(lines[0] + lines[1] + lines[2][:9])  # the third is being written
    records, restarted = tail.read()
    assert [r["file"] for r in records] == ["0.png", "1.png"] and not restarted
    assert tail.read() == ([], False)
    with open(path, "a") as handle:
        handle.write(lines[2][9:] + lines[3])
    assert [r["file"] for r in tail.read()[0]] == ["2.png", "3.png"]
    assert tail.offset == path.stat().st_size  # read by offset: nothing read twice
    path.write_text(lines[0] + lines[3])  # a restarting line cut back a torn commit
    records, restarted = tail.read()
    assert restarted and [r["file"] for r in records] == ["0.png", "3.png"]


def test_a_long_journal_is_shown_as_it_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(view_state, "READ_CHUNK", 64)  # bytes per read
    monkeypatch.setattr(view_state, "CATCH_UP_S", -1.0)  # one read per poll
    lines = [json.dumps({"file": f"{n}.png", "commit": n}) for n in range(10)]
    lines.insert(3, "x" * 200)  # not a record, and longer than a read: passed over
    (tmp_path / RESULTS_FILE).write_text("\n".join(lines) + "\n")
    view = OutFolderView(tmp_path)
    seen = []
    while not seen or view.behind:
        view.poll()
        seen.append(view.state.counts.seen)
    assert seen[-1] == 10 and len(seen) > 5 and seen == sorted(seen)
    assert [card["file"] for card in view.state.recent][:2] == ["9.png", "8.png"]


def test_state_counts_rate_latency_and_flags() -> None:
    state = ViewState()
    at = "2025-01-01T00:00:{:02d}.000+00:00"
    for commit_no, second in ((1, 0), (2, 10), (3, 20)):
        for index in range(4):
            state.add(
                {
                    "file": f"{commit_no}-{index}.png",
                    "commit": commit_no,
                    "score": 0.1 * index,
                    "label": "anomalous" if index == 3 else "normal",
                    "threshold": 0.25,
                    "calibrated": False,
                    "threshold_basis": "history",
                    "shift": commit_no == 2,
                    "timings": {"latency_ms": 100.0 * (index + 1)},
                    "recorded_at": at.format(second),
                }
            )
    state.add({"file": "bad.png", "commit": 4, "error": "corrupt", "recorded_at": at.format(20)})
    summary = state.summary()
    assert summary["counts"] == {
        "seen": 13,
        "scored": 12,
        "anomalous": 3,
        "normal": 9,
        "unlabelled": 0,
        "unjudged": 0,
        "failed": 1,
        "repeated": 0,
        "joined": 0,
        "shift_commits": 1,
        "items_anomalous": {},
    }
    # commits 2 and 3 (8 parts plus the failure) came in the 20 s after the first commit
    assert summary["throughput_per_minute"] == pytest.approx(60 * 9 / 20)
    assert summary["median_latency_ms"] == 250.0
    assert summary["calibrated"] is False and summary["shift"] is False  # commit 3 is back
    assert [card["file"] for card in summary["recent"][:2]] == ["bad.png", "3-3.png"]
    assert summary["timeline"]["score"][-1] == pytest.approx(0.3)
    for n in range(600):
        state.add({"file": f"x{n}.png", "commit": 5 + n, "score": 0.1, "recorded_at": None})
    summary = state.summary()
    assert len(summary["recent"]) == 50 and len(summary["timeline"]["score"]) == 500


def test_state_health_and_metrics_say_what_the_journal_holds(view: ViewServer) -> None:
    status, kind, body = get(view.url + "healthz")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok" and health["records"] == 4
    assert health["last_record_at"]

    state = json.loads(get(view.url + "api/state")[2])
    assert state["counts"]["anomalous"] == 1 and state["counts"]["failed"] == 1
    assert [card["file"] for card in state["recent"]] == ["bad.png", "c.png", "b.png", "a.png"]
    assert state["calibrated"] is False and state["threshold"] == 0.5

    status, kind, body = get(view.url + "metrics")
    assert kind.startswith("text/plain; version=0.0.4")
    samples = parse_prometheus(body.decode())
    assert samples["musc_parts_total", 'label="anomalous"'] == 1
    assert samples["musc_parts_total", 'label="normal"'] == 2
    assert samples["musc_failed_total", ""] == 1
    assert samples["musc_records_total", ""] == 4
    assert samples["musc_repeated_total", ""] == 1
    assert samples["musc_threshold", ""] == 0.5 and samples["musc_last_score", ""] == 0.3
    assert samples["musc_latency_ms", ""] == 100 and samples["musc_calibrated", ""] == 0

    status, kind, page = get(view.url)
    assert kind.startswith("text/html") and b"EventSource" in page
    assert not re.search(rb"(src|href)=\"?(https?:)?//", page)  # the line has no internet


def test_files_serves_overlays_and_nothing_outside_batches(
    view: ViewServer, out: Path, tmp_path: Path
) -> None:
    status, kind, body = get(view.url + "files/" + OVERLAY)
    assert status == 200 and kind == "image/png" and body == (out / OVERLAY).read_bytes()
    secret = tmp_path / "secret.png"
    shutil.copy(out / OVERLAY, secret)
    (out / "batches" / "000001" / "overlays" / "link_png.png").symlink_to(secret)
    refused = [
        "/files/../results.jsonl",
        "/files/batches/../results.jsonl",
        "/files/batches/000001/../../results.jsonl",
        "/files/%2e%2e/results.jsonl",
        "/files/results.jsonl",
        "/files//etc/passwd",
        "/files/%2Fetc%2Fpasswd",
        f"/files/{secret}",
        "/files/../secret.png",
        "/files/batches/000001/overlays/link_png.png",
        "/files/batches/000001",
        "/files/batches/",
        "/files/batches/000001/overlays/a%00.png",
    ]
    assert {path: raw_status(view, path) for path in refused} == dict.fromkeys(refused, 404)


def test_sink_backlog_comes_from_the_outbox(out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outbox = types.SimpleNamespace(backlog=lambda out_dir: {"mqtt": 3, "webhook": 0})
    monkeypatch.setattr(sinks, "outbox", outbox, raising=False)
    view = OutFolderView(out)
    assert view.poll()
    snapshot = view.snapshot()
    assert snapshot["backlog"] == {"mqtt": 3, "webhook": 0}
    samples = parse_prometheus(prometheus_text(snapshot))
    assert samples["musc_sink_backlog", 'sink="mqtt"'] == 3
    assert samples["musc_sink_backlog", 'sink="webhook"'] == 0
    assert not view.poll()  # nothing new: no update is pushed


def next_data(lines: Iterator[str]) -> dict:
    return next(json.loads(line[6:]) for line in lines if line.startswith("data: "))


def test_events_push_each_change_and_streams_end_cleanly(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(view_server, "HEARTBEAT_S", 0.3)
    with serve(out, port=0) as view, httpx.Client(timeout=5) as client:
        with client.stream("GET", view.url + "events") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = response.iter_lines()
            assert next_data(lines)["records"] == 4
            assert json.loads(get(view.url + "healthz")[2])["clients"] == 1
            commit(out, record("d.png", 0.4), record("e.png", 0.8, label="anomalous"))
            update = next_data(lines)
            assert update["records"] == 6 and update["recent"][0]["file"] == "e.png"
            assert next(line for line in lines if line.startswith(":")) == ": heartbeat"
        deadline = time.monotonic() + 5
        while json.loads(get(view.url + "healthz")[2])["clients"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert json.loads(get(view.url + "healthz")[2])["clients"] == 0  # the stream is gone

        with client.stream("GET", view.url + "events") as response:
            lines = response.iter_lines()
            next_data(lines)
            started = time.monotonic()
            view.stop()  # with a browser still watching
            list(lines)  # ends: the server closed the stream instead of waiting for it
            assert time.monotonic() - started < 3


def test_remote_hosts_need_allow_remote_and_a_busy_port_is_named(out: Path) -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.4.5.6", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "192.0.2.7", "::", "example.com"]))
    for host in ("0.0.0.0", "192.0.2.7"):
        with pytest.raises(UsageError, match="pass --allow-remote to serve on other interfaces"):
            serve(out, host=host, port=0)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UsageError, match=f"port {port} on 127.0.0.1 is in use"):
            serve(out, port=port)


def test_view_command_serves_until_ctrl_c(out: Path, tmp_path: Path) -> None:
    missing = CliRunner().invoke(app, ["view", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2
    assert missing.output.startswith("error: out folder") and missing.output.count("\n") == 1

    command = [sys.executable, "-c", "from musc_edge.cli import app; app()", "view", str(out)]
    process = subprocess.Popen(
        [*command, "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        shown = process.stdout.readline()
        url = re.search(r"at (http://\S+) ", shown)
        assert url, shown + process.stderr.read()
        assert json.loads(get(url[1] + "healthz")[2])["records"] == 4
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0
    finally:
        process.kill()
        process.wait()


def take_screenshot(page, tmp_path: Path) -> Path:
    """docs/view.png when asked to refresh it (MUSC_UPDATE_SCREENSHOT=1), else a tmp file."""
    target = DOCS_SCREENSHOT if os.environ.get(UPDATE_SCREENSHOT) == "1" else tmp_path / "view.png"
    page.screenshot(path=str(target), full_page=True)
    return target


def screenshot_line(request: pytest.FixtureRequest, tmp_path: Path) -> Line:
    """The docs screenshot's line: the real dinov2-vits14 package at 224 px, ONNX Runtime."""
    package = load_package(request.getfixturevalue("vits14_package"))
    settings = LineSettings(tmp_path / "camera", tmp_path / "out", settle=0.0, poll=0.01, **LINE)
    return Line(
        settings,
        LocalBackend(package, open_runner(package, "onnxruntime"), MuSc.for_package(package)),
    )


def bottle_images(count: int) -> list[Path]:
    """The docs screenshot's parts: real bottles, good ones while the line warms up (the
    first five), then a broken one every fourth part."""
    need(BOTTLE.is_dir(), f"shared data missing: no MVTec bottle at {BOTTLE}")
    good = sorted((BOTTLE / "test" / "good").glob("*.png"))
    bad = sorted((BOTTLE / "test" / "broken_large").glob("*.png"))
    return [bad.pop(0) if index > 4 and index % 4 == 3 else good.pop(0) for index in range(count)]


def write_part(camera: Path, index: int, images: list[Path] | None) -> str:
    if images is None:
        return write_parts(camera, 1, start=index)[0]
    name = f"part_{index:03d}.png"
    shutil.copy(images[index], camera / f".{name}")
    (camera / f".{name}").rename(camera / name)  # a camera writes, then renames
    return name


def test_page_follows_a_running_line_in_a_browser(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    need(CHROMIUM.is_file(), f"no chromium at {CHROMIUM} (apt install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need(False, "playwright is not installed (pip install playwright)")
    camera = tmp_path / "camera"
    camera.mkdir()
    if os.environ.get(UPDATE_SCREENSHOT) == "1":
        count, images, line = 20, bottle_images(20), screenshot_line(request, tmp_path)
    else:
        count, images, line = 8, None, make_line(tmp_path, **LINE)
    stop = threading.Event()
    running = threading.Thread(target=line.run, args=(stop,))
    running.start()
    try:
        with (
            serve(tmp_path / "out", port=0) as view,
            sync_playwright() as playwright,
        ):
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(view.url)
            page.wait_for_selector("#connection.live", timeout=10_000)
            assert page.locator(".card").count() == 0
            names = [write_part(camera, index, images) for index in range(5)]
            page.wait_for_function("document.querySelectorAll('.card').length === 5")
            (camera / "torn.png").write_bytes(b"\x89PNG\r\n")  # a file that never decodes
            failed = page.wait_for_selector(".card.failed", timeout=10_000)
            assert "not a decodable image" in failed.inner_text()
            for index in range(5, count):
                names.append(write_part(camera, index, images))
                page.wait_for_selector(f'.card[data-file="{names[-1]}"]', timeout=10_000)
            page.wait_for_function(f"document.querySelectorAll('circle.point').length === {count}")
            newest = page.locator(".card").first
            assert newest.locator(".file").inner_text() == names[-1]
            assert float(newest.locator(".score").inner_text()) >= 0
            warm_up = page.locator(".card .verdict").all_inner_texts()[-5:]
            assert set(warm_up) <= {"NORMAL", "ANOMALOUS"}  # a threshold from the first five
            anomalous = page.locator(".tile.anomalous .value").inner_text()
            assert anomalous == str(page.locator(".card.anomalous").count())
            assert page.locator(".card img.thumb").count() == count
            page.wait_for_function(
                "[...document.querySelectorAll('.card img')].every(i => i.naturalWidth > 0)"
            )
            assert page.locator(".badge.uncalibrated").is_visible()
            assert "rolling mode" in page.locator("#run").inner_text()  # from the manifest
            assert page.locator("#timeline path").count() == 1  # the threshold line
            assert page.locator(".tile .value").first.inner_text() == str(count + 1)
            assert take_screenshot(page, tmp_path).stat().st_size > 10_000
            browser.close()
    finally:
        stop.set()
        running.join(30)
