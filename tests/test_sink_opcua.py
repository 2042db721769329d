"""The opcua sink, read by a real asyncua client the way a PLC would, by documented NodeIds.

The line runs on the stand-in backbone of tests/helpers.py, on a free loopback port.
"""

from __future__ import annotations

import json
import math
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua
from asyncua.sync import Client

from musc_edge.errors import UsageError
from musc_edge.runtime.journal import RESULTS_FILE, Journal
from musc_edge.runtime.record import ResultRecord
from musc_edge.runtime.sinks import SinkSetup, open_sinks, parse_sink_spec, sink_options
from musc_edge.runtime.sinks.opcua import VARIABLES, OpcUaOptions, listen_address
from tests.helpers import free_port, make_line, wait_until, write_parts

DOC = Path(__file__).resolve().parents[1] / "docs" / "opcua.md"
HEARTBEAT_S = 0.2


def free_endpoint() -> tuple[str, int]:
    port = free_port()
    return f"opc.tcp://127.0.0.1:{port}/musc-edge/", port


def read_all(client: Client, station: str = "line1.station1") -> dict[str, Any]:
    """Every variable in one Read request, by its documented NodeId."""
    ns = client.get_namespace_index("urn:musc-edge")
    nodes = [client.get_node(f"ns={ns};s={station}.{name}") for name in VARIABLES]
    return dict(zip(VARIABLES, client.read_values(nodes), strict=True))


def journal(out: Path) -> list[ResultRecord]:
    lines = (out / RESULTS_FILE).read_text().splitlines()
    return [ResultRecord.from_dict(json.loads(line)) for line in lines]


def same(value: float, expected: float | None) -> bool:
    """A Double variable holds NaN where the record holds None."""
    return math.isnan(value) if expected is None else value == expected


def matches(values: dict[str, Any], records: list[ResultRecord]) -> None:
    """The variables say what the journal says: its counts and its last answer."""
    last = records[-1]
    scored = [r for r in records if not r.error]
    assert values["VerdictSequence"] == len(records)
    assert values["PartCount"] == len(scored)
    assert values["FailedCount"] == len(records) - len(scored)
    assert values["AnomalousCount"] == sum(r.label == "anomalous" for r in records)
    assert values["LastFile"] == last.file
    assert values["LastRecordId"] == last.record_id
    if last.error:
        assert values["LastVerdict"] == "error" and math.isnan(values["LastScore"])
    else:
        assert values["LastVerdict"] == (last.label or "unknown")
        assert same(values["LastScore"], last.score)
    assert same(values["Threshold"], scored[-1].threshold)
    assert values["Calibrated"] is scored[-1].calibrated
    assert (values["Shift"], values["Repeated"]) == (last.shift, last.repeated)


def opcua(endpoint: str, **options: Any) -> dict[str, dict[str, Any]]:
    return {"opcua": {"endpoint": endpoint, "heartbeat_s": HEARTBEAT_S, **options}}


def test_a_plc_reads_the_line_state_while_it_runs(tmp_path: Path) -> None:
    camera, out = tmp_path / "camera", tmp_path / "out"
    camera.mkdir()
    endpoint, port = free_endpoint()
    sinks = opcua(endpoint, line="l1", station="cam1")
    settings = {"watch": True, "batch_size": 2, "threshold": 0.5, "decode_timeout": 0.0}
    line = make_line(tmp_path, sinks=sinks, **settings)
    stop = threading.Event()
    running = threading.Thread(target=line.run, args=(stop,))
    with Client(endpoint) as client:
        running.start()
        assert client.get_namespace_index("urn:musc-edge") == 2  # as docs/opcua.md says
        values = read_all(client, "l1.cam1")
        assert values["State"] == "running" and values["VerdictSequence"] == 0
        assert values["LastVerdict"] == "" and math.isnan(values["LastScore"])

        sequence = client.get_node("ns=2;s=l1.cam1.VerdictSequence")
        for start in (0, 2):
            write_parts(camera, 2, start=start)
            wait_until(
                lambda n=start + 2: sequence.read_value() == n, f"{start + 2} answers", timeout=60
            )
            values = read_all(client, "l1.cam1")
            assert values["State"] == "running" and values["Threshold"] == 0.5
            matches(values, journal(out))
        (camera / "broken.png").write_bytes(b"not an image")
        wait_until(lambda: sequence.read_value() == 5, "the failed file", timeout=60)
        values = read_all(client, "l1.cam1")
        assert values["LastVerdict"] == "error" and values["FailedCount"] == 1
        matches(values, journal(out))

        heartbeat = client.get_node("ns=2;s=l1.cam1.Heartbeat")
        first = heartbeat.read_value()
        wait_until(lambda: heartbeat.read_value() > first, "a heartbeat", timeout=10)
        with pytest.raises(ua.UaStatusCodeError, match="BadUserAccessDenied"):
            sequence.write_value(ua.Variant(0, ua.VariantType.UInt64))
        admin = Client(endpoint)
        admin.set_user("admin")
        admin.set_password("admin")
        with pytest.raises(ua.UaStatusCodeError, match="BadIdentityTokenRejected"):
            admin.connect()
        admin.disconnect()

        stop.set()
        seen = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # poll as a PLC would until the server goes
            try:
                seen.append(read_all(client, "l1.cam1"))
            except (ConnectionError, TimeoutError, ua.UaError):
                break
        running.join(timeout=30)
    assert not running.is_alive()
    assert seen[-1]["State"] == "stopped"
    matches(seen[-1], journal(out))
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_counts_resume_after_a_restart(tmp_path: Path) -> None:
    camera, out = tmp_path / "camera", tmp_path / "out"
    write_parts(camera, 3)
    (camera / "broken.png").write_bytes(b"garbage")
    endpoint, _ = free_endpoint()
    make_line(tmp_path, decode_timeout=0.0, sinks=opcua(endpoint)).run()
    assert len(journal(out)) == 4

    line = make_line(tmp_path, watch=True, sinks=opcua(endpoint))  # the same port, freed
    stop = threading.Event()
    running = threading.Thread(target=line.run, args=(stop,))
    with Client(endpoint) as client:
        matches(read_all(client), journal(out))  # before anything new arrives
        running.start()
        write_parts(camera, 4, start=3)
        wait_until(lambda: read_all(client)["VerdictSequence"] == 8, "the new parts", timeout=60)
        values = read_all(client)
        assert values["PartCount"] == 7 and values["FailedCount"] == 1
        matches(values, journal(out))
        stop.set()
        running.join(timeout=30)
    assert not running.is_alive()


def setup_for(tmp_path: Path) -> SinkSetup:
    return SinkSetup(tmp_path / "out", Journal(tmp_path / "out"), {})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"endpoint": "opc.tcp://0.0.0.0:4840/musc-edge/"}, "host 0.0.0.0 .* allow_remote=true"),
        ({"endpoint": "opc.tcp://plc-net.local:4840/"}, "host plc-net.local .* allow_remote"),
        ({"endpoint": "http://127.0.0.1:4840/"}, r"is not opc\.tcp://HOST:PORT/PATH"),
        ({"endpoint": "opc.tcp://127.0.0.1/musc-edge/"}, r"is not opc\.tcp://HOST:PORT/PATH"),
        ({"hearbeat_s": "1"}, r"hearbeat_s: Extra inputs .* \(its options: endpoint, "),
        ({"heartbeat_s": "0"}, "heartbeat_s: Input should be greater than 0"),
        ({"station": "cam.1"}, "station: String should match pattern"),
        ({"allow_remote": "maybe"}, "allow_remote: Input should be a valid boolean"),
    ],
)
def test_bad_options_are_refused_in_one_line(
    tmp_path: Path, options: dict[str, str], message: str
) -> None:
    with pytest.raises(UsageError, match=f"^sink opcua: .*{message}") as refused:
        open_sinks(setup_for(tmp_path), {"opcua": options})
    assert "\n" not in str(refused.value)


def test_a_busy_port_is_refused_naming_it(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        endpoint = f"opc.tcp://127.0.0.1:{port}/musc-edge/"
        with pytest.raises(UsageError, match=f"port {port}: is already in use") as refused:
            open_sinks(setup_for(tmp_path), {"opcua": {"endpoint": endpoint}})
    assert "\n" not in str(refused.value)
    assert "musc-edge opcua" not in [thread.name for thread in threading.enumerate()]


def test_the_documented_cli_form_and_node_ids(tmp_path: Path) -> None:
    text = DOC.read_text()
    spec = re.search(r"--sink (opcua:endpoint=\S+)", text)
    assert spec, "docs/opcua.md shows the --sink form"
    setup = SinkSetup(tmp_path, Journal(tmp_path), {}, "opcua", parse_sink_spec(spec[1])[1])
    options = sink_options(OpcUaOptions, setup)
    assert options.allow_remote and (options.line, options.station) == ("l1", "cam1")
    assert listen_address(options) == ("0.0.0.0", 4840)
    loopback = OpcUaOptions(endpoint="opc.tcp://[::1]:4841/musc-edge/")
    assert listen_address(loopback) == ("::1", 4841)
    for name, kind in VARIABLES.items():
        assert re.search(rf"`ns=2;s=line1\.station1\.{name}` \| {kind.name} \|", text), name
