"""The network sinks against real receivers: a Mosquitto broker stopped and restarted in the
middle of a run, an HTTP server that fails before it answers, restarts after a crash, a full
outbox and refused options. Nothing is mocked; the line runs on the stand-in backbone."""

from __future__ import annotations

import json
import logging
import os
import pwd
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from paho.mqtt.client import Client
from paho.mqtt.enums import CallbackAPIVersion
from typer.testing import CliRunner

from musc_edge.cli import app
from musc_edge.errors import UsageError
from musc_edge.runtime.journal import RESULTS_FILE, Journal
from musc_edge.runtime.sinks.outbox import (
    SEGMENT_SUFFIX,
    STATE_FILE,
    backlog,
    outbox_dir,
    read_state,
)
from tests.conftest import need
from tests.helpers import (
    Receiver,
    free_port,
    make_line,
    results,
    wait_until,
    write_package,
    write_parts,
)

MOSQUITTO = Path("/usr/sbin/mosquitto")
TOKEN = "s3cret-t0ken-never-logged"
FAST = {"retry_s": 0.05, "retry_max_s": 0.3, "timeout_s": 2.0}  # backoff and waits for tests


def journal_ids(out: Path) -> list[str]:
    return [record.record_id for record in Journal(out).records()]


def committed(out: Path) -> int:
    path = out / RESULTS_FILE
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def first_arrivals(ids: list[str]) -> list[str]:
    """What a receiver keeps when it drops repeats by id."""
    return list(dict.fromkeys(ids))


def arrive(camera: Path, count: int, start: int) -> None:
    """Parts written elsewhere and renamed in, as a camera that writes then renames does."""
    staging = camera.parent / "staging"
    for name in write_parts(staging, count, start):
        (staging / name).replace(camera / name)


class Broker:
    """Mosquitto on a loopback port, persisting queued QoS 1 messages across restarts."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.config = folder / "mosquitto.conf"
        user = pwd.getpwuid(os.getuid()).pw_name  # as root it would switch to `mosquitto`
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\nuser {user}\n"
            f"persistence true\npersistence_location {folder}/\n"
            f"log_dest file {folder}/mosquitto.log\n"
        )
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen([str(MOSQUITTO), "-c", str(self.config)])
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert self.process.poll() is None, "mosquitto exited at start"
                assert time.monotonic() < deadline, "mosquitto did not listen"
                time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()  # it saves its persistence file on the way out
            self.process.wait(10)
            self.process = None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    need(MOSQUITTO.is_file(), f"no Mosquitto broker at {MOSQUITTO} (apt-get install mosquitto)")
    folder = tmp_path / "broker"
    folder.mkdir()
    broker = Broker(folder)
    broker.start()
    yield broker
    broker.stop()


class Collector:
    """A subscriber with a persistent session: what the broker queued while it was away
    arrives when it is back."""

    def __init__(self, port: int, topic: str, client_id: str = "collector") -> None:
        self.messages: list[tuple[str, dict]] = []
        self.subscribed = threading.Event()
        client = Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        client.on_connect = lambda client, *args: client.subscribe(topic, qos=1)
        client.on_subscribe = lambda *args: self.subscribed.set()
        client.on_message = lambda client, userdata, message: self.messages.append(
            (message.topic, json.loads(message.payload))
        )
        client.reconnect_delay_set(0.1, 0.5)
        client.connect("127.0.0.1", port)
        client.loop_start()
        self.client = client
        assert self.subscribed.wait(10), "no SUBACK"

    def payloads(self, suffix: str) -> list[dict]:
        return [payload for topic, payload in list(self.messages) if topic.endswith(suffix)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_mqtt_delivers_every_record_once_through_a_broker_restart(
    tmp_path: Path, broker: Broker
) -> None:
    collector = Collector(broker.port, "musc/l1/cam1/#")
    options = {"host": "127.0.0.1", "port": broker.port, "line": "l1", "station": "cam1"}
    options |= {**FAST, "heartbeat_s": 0.2}
    camera, out = tmp_path / "camera", tmp_path / "out"
    camera.mkdir()
    line = make_line(tmp_path, watch=True, max_wait=0.1, sinks={"mqtt": options})
    stop = threading.Event()
    running = threading.Thread(target=line.run, args=(stop,))
    running.start()
    try:
        arrive(camera, 4, 0)
        wait_until(lambda: committed(out) == 4 and backlog(out) == {"mqtt": 0}, "first batch")
        broker.stop()
        arrive(camera, 8, 4)
        wait_until(lambda: committed(out) == 12, "the batches scored while the broker is down")
        assert backlog(out)["mqtt"] > 0  # waiting on disk
        broker.start()
        arrive(camera, 4, 12)
        wait_until(lambda: committed(out) == 16 and backlog(out) == {"mqtt": 0}, "the backlog")
    finally:
        stop.set()
        running.join(30)
    expected = journal_ids(out)
    assert len(expected) == 16
    wait_until(lambda: len({m["id"] for m in collector.payloads("/result")}) == 16, "all 16")
    wait_until(lambda: collector.payloads("/status")[-1]["state"] == "stopped", "stopped")
    collector.close()
    received = [message["id"] for message in collector.payloads("/result")]
    assert first_arrivals(received) == expected  # all, in order, once after dropping repeats
    statuses = collector.payloads("/status")
    assert any(s["state"] == "running" and s["parts"] > 0 for s in statuses)
    assert statuses[-1]["state"] == "stopped"

    retained = Collector(broker.port, "musc/l1/cam1/status", client_id="late-reader")
    wait_until(lambda: retained.messages, "the retained status")
    retained.close()
    (status,) = retained.payloads("/status")
    assert status["state"] == "stopped" and status["backlog"] == 0
    assert status["parts"] == 16 and set(status) == {
        "state",
        "time",
        "parts",
        "anomalous",
        "backlog",
        "health",
    }


def test_mqtt_status_says_degraded_while_the_camera_folder_is_gone(
    tmp_path: Path, broker: Broker
) -> None:
    collector = Collector(broker.port, "musc/l1/cam1/status")
    options = {"host": "127.0.0.1", "port": broker.port, "line": "l1", "station": "cam1"}
    camera = tmp_path / "camera"
    write_parts(camera, 4)
    line = make_line(tmp_path, watch=True, sinks={"mqtt": {**options, **FAST}})
    stop = threading.Event()
    running = threading.Thread(target=line.run, args=(stop,))
    running.start()
    try:
        wait_until(lambda: committed(tmp_path / "out") == 4, "the first parts")
        camera.rename(tmp_path / "unmounted")
        wait_until(
            lambda: any(s["state"] == "degraded" for s in collector.payloads("/status")),
            "a degraded status (published at once, not at the next heartbeat)",
        )
        degraded = next(s for s in collector.payloads("/status") if s["state"] == "degraded")
        assert "camera folder" in degraded["health"]["problems"]["camera"]
        (tmp_path / "unmounted").rename(camera)
        wait_until(lambda: collector.payloads("/status")[-1]["state"] == "running", "running")
    finally:
        stop.set()
        running.join(30)
        collector.close()
    assert collector.payloads("/status")[-1]["health"]["status"] == "ok"


def test_mqtt_backlog_of_a_run_without_broker_is_sent_by_the_next_run(
    tmp_path: Path, broker: Broker, caplog
) -> None:
    broker.stop()
    write_parts(tmp_path / "camera", 4)
    options = {"host": "127.0.0.1", "port": broker.port, "flush_s": 0, **FAST}
    make_line(tmp_path, sinks={"mqtt": options}).run()  # stops at once, broker or not
    out = tmp_path / "out"
    assert backlog(out) == {"mqtt": 4}
    offline = [r for r in caplog.records if "cannot connect" in r.getMessage()]
    assert len(offline) == 1  # once per outage, not per reconnection attempt

    broker.start()
    collector = Collector(broker.port, "musc/line1/station1/result")
    make_line(tmp_path, sinks={"mqtt": {**options, "flush_s": 10}}).run()
    assert backlog(out) == {"mqtt": 0}
    wait_until(lambda: len(collector.messages) >= 4, "the backlog at the collector")
    collector.close()
    assert first_arrivals([m["id"] for m in collector.payloads("/result")]) == journal_ids(out)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver(failures=3)
    yield receiver
    receiver.close()


def test_webhook_retries_until_delivered_and_never_shows_the_token(
    tmp_path: Path, receiver: Receiver, monkeypatch, caplog
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("MUSC_TEST_TOKEN", TOKEN)
    write_parts(tmp_path / "camera", 8)
    options = {"url": receiver.url, "token_env": "MUSC_TEST_TOKEN", **FAST}
    make_line(tmp_path, sinks={"webhook": options}).run()

    out = tmp_path / "out"
    assert backlog(out) == {"webhook": 0}
    assert first_arrivals(receiver.ids()) == journal_ids(out)
    assert len(receiver.requests) == 8 + 3  # the first one three times
    for headers, body in receiver.requests:
        assert headers["Authorization"] == f"Bearer {TOKEN}"
        assert headers["Idempotency-Key"] == headers["X-Musc-Record-Id"] == body["id"]
        assert headers["Content-Type"] == "application/json"
    failures = [r.getMessage() for r in caplog.records if "delivery failed" in r.getMessage()]
    assert len(failures) == 3 and "HTTP 500" in failures[0] and "site=7" not in failures[0]
    assert TOKEN not in caplog.text
    for path in out.rglob("*"):
        assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path
    assert sorted(p.name for p in outbox_dir(out, "webhook").iterdir()) == [STATE_FILE]


def test_a_backlog_survives_restarts_and_a_crash_before_the_outbox_write(
    tmp_path: Path, caplog
) -> None:
    camera, out = tmp_path / "camera", tmp_path / "out"
    write_parts(camera, 8)
    down = {"url": f"http://127.0.0.1:{free_port()}/results", "flush_s": 0.2, **FAST}
    make_line(tmp_path, sinks={"webhook": down}).run()
    assert backlog(out) == {"webhook": 8}
    assert "8 message(s) undelivered" in caplog.text

    # a crash after the journal's write of the next commit but before the outbox's: the
    # segment holds one of its four messages and half of another
    write_parts(camera, 4, start=8)
    make_line(tmp_path, sinks={"webhook": down}).run()
    (segment,) = outbox_dir(out, "webhook").glob(f"*{SEGMENT_SUFFIX}")
    lines = segment.read_bytes().splitlines(keepends=True)
    assert len(lines) == 12
    segment.write_bytes(b"".join(lines[:9]) + lines[9][:50])

    receiver = Receiver()
    try:
        make_line(tmp_path, sinks={"webhook": {"url": receiver.url, **FAST}}).run()
        assert receiver.ids() == journal_ids(out)  # in order, none lost, none twice
        assert backlog(out) == {"webhook": 0}

        shutil.rmtree(outbox_dir(out, "webhook"))  # an outbox lost: the journal sends again
        make_line(tmp_path, sinks={"webhook": {"url": receiver.url, **FAST}}).run()
        assert receiver.ids() == journal_ids(out) * 2
    finally:
        receiver.close()


def test_a_full_outbox_drops_the_oldest_and_counts_them(tmp_path: Path, caplog) -> None:
    write_parts(tmp_path / "camera", 8)
    down = {"url": f"http://127.0.0.1:{free_port()}/r", "outbox_max": 3, "flush_s": 0, **FAST}
    make_line(tmp_path, sinks={"webhook": down}).run()
    out = tmp_path / "out"
    assert backlog(out) == {"webhook": 3}
    assert read_state(outbox_dir(out, "webhook")).dropped == 5
    drops = [r.getMessage() for r in caplog.records if "outbox full" in r.getMessage()]
    assert len(drops) == 2  # at the first overflow, then the rest at close, not per commit
    assert "dropped 1 of the oldest undelivered message(s), 1 in all" in drops[0]
    assert "dropped 4 of the oldest undelivered message(s), 5 in all" in drops[1]
    assert "results.jsonl still holds them" in drops[1]

    receiver = Receiver()
    try:
        make_line(tmp_path, sinks={"webhook": {"url": receiver.url, **FAST}}).run()
    finally:
        receiver.close()
    assert receiver.ids() == journal_ids(out)[-3:]
    assert read_state(outbox_dir(out, "webhook")).dropped == 5


@pytest.mark.parametrize(
    ("sinks", "message"),
    [
        ({"mqtt": {}}, r"^sink mqtt: host: Field required \(its options: .*host, port"),
        ({"mqtt": {"host": "b", "qos": "0"}}, r"^sink mqtt: qos: Input should be greater"),
        ({"mqtt": {"host": "b", "line": "a/+"}}, r"^sink mqtt: line: String should match"),
        ({"mqtt": {"host": "b", "password_env": "P"}}, r"password_env needs a username"),
        ({"webhook": {"url": "ftp://x"}}, r"^sink webhook: url: Value error, must be an http"),
        (
            {"webhook": {"url": "http://x", "tokn_env": "T"}},
            r"^sink webhook: tokn_env: Extra inputs are not permitted \(its options: .*token_env",
        ),
        (
            {"webhook": {"url": "http://x", "token_env": "MUSC_TEST_UNSET"}},
            r"^sink webhook: token_env=MUSC_TEST_UNSET, but that environment variable is unset$",
        ),
    ],
)
def test_bad_options_are_one_clear_usage_error(
    tmp_path: Path, sinks: dict, message: str, monkeypatch
) -> None:
    monkeypatch.delenv("MUSC_TEST_UNSET", raising=False)
    (tmp_path / "camera").mkdir()
    with pytest.raises(UsageError, match=message) as error:
        make_line(tmp_path, sinks=sinks)
    assert "\n" not in str(error.value)
    assert not [t for t in threading.enumerate() if t.name.startswith("musc-edge")]


def test_run_sends_to_a_webhook_from_the_command_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    write_package(tmp_path / "pkg", weights_source="random-init", layers=[1, 2])
    write_parts(tmp_path / "camera", 4)
    receiver = Receiver(failures=1)
    spec = f"webhook:url={receiver.url.split('?')[0]},retry_s=0.05"
    args = ["run", "--camera-dir", str(tmp_path / "camera"), "--model", str(tmp_path / "pkg")]
    fast = ["--once", "--engine", "torch", "--allow-random-init", "--settle", "0"]
    out = tmp_path / "out"
    try:
        result = CliRunner().invoke(
            app, [*args, *fast, "--batch-size", "4", "--out", str(out), "--sink", spec]
        )
    finally:
        receiver.close()
    assert result.exit_code == 0, result.output
    assert first_arrivals(receiver.ids()) == journal_ids(out) and len(results(out)) == 4
