"""A plant's scoring service (`musc-edge serve`, real Ray Serve) and its stations (`run
--remote`) on real bottles and the real package: the records `run` writes, the service down
and back, and two stations served by replicas on two nodes while one node dies."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from musc_edge.errors import UsageError
from musc_edge.package import load_package
from musc_edge.runtime.remote import ServiceClient
from musc_edge.runtime.settings import load_settings
from musc_edge.runtime.wire import decode_batch, encode_batch
from tests.helpers import CLI, free_port, ray_start, results, worker_raylet

pytest.importorskip(
    "ray.serve", reason="Ray Serve is the cluster extra: pip install -e '.[cluster]'"
)

START = 1_796_000_000  # the first part's modification time


def bottles(bottle_dir: Path, folder: Path, good: slice, broken: int = 0) -> list[str]:
    """Real bottles copied into a camera folder, their modification times in this order."""
    sources = [
        *sorted((bottle_dir / "test" / "good").glob("*.png"))[good],  # 20 of them
        *sorted((bottle_dir / "test" / "broken_large").glob("*.png"))[:broken],
    ]
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for index, source in enumerate(sources):
        name = f"{source.parent.name}_{source.name}"
        shutil.copy(source, folder / name)
        os.utime(folder / name, (START + index, START + index))
        names.append(name)
    return names


def by_file(out: Path) -> dict[str, dict]:
    return {record["file"]: record for record in results(out)}


def same_records(expected: dict[str, dict], got: dict[str, dict]) -> None:
    """The same files in the same batches, with the same verdicts and (to float32 rounding:
    the backbone ran in other batches) the same scores."""
    assert sorted(got) == sorted(expected)
    for name, record in expected.items():
        mine = got[name]
        assert (mine["error"] is None) == (record["error"] is None), name
        if record["error"] is not None:
            continue
        assert mine["batch"] == record["batch"], name
        assert (mine["label"], mine["threshold_basis"]) == (
            record["label"],
            record["threshold_basis"],
        )
        assert mine["score"] == pytest.approx(record["score"], abs=1e-5)
        assert mine["raw_score"] == pytest.approx(record["raw_score"], abs=1e-5)
        assert mine["threshold"] == pytest.approx(record["threshold"], abs=1e-5)


def write_plant(path: Path, lines: dict[str, dict], **service) -> Path:
    path.write_text(yaml.safe_dump({"lines": lines, "engine": "onnxruntime", **service}))
    return path


def run_line(camera: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, "run", "--camera-dir", str(camera), "--out", str(out), "--once", "--settle", "0",
         "--batch-size", "5", *options],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def station_process(camera: Path, out: Path, url: str, line: str) -> subprocess.Popen:
    """A station over the parts already in its camera folder (`--once`)."""
    command = [*CLI, "run", "--camera-dir", str(camera), "--out", str(out), "--once",
               "--settle", "0", "--batch-size", "5", "--remote", url, "--line", line,
               "--remote-timeout", "60"]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


class Service:
    """`musc-edge serve` in its own process, stopped as an operator would (Ctrl-C)."""

    def __init__(self, plant: Path, port: int, log: Path, *options: str) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        command = [*CLI, "serve", "--config", str(plant), "--port", str(port), *options]
        with log.open("a") as handle:
            self.process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert self.process.poll() is None, log.read_text()
            try:
                get(self.url + "/healthz")
                return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"the service did not come up: {log.read_text()}")

    def nodes(self, line: str, pixels: np.ndarray, asks: int = 6) -> set[str]:
        """The nodes whose replicas scored `asks` batches sent at once (Serve sends each to the
        replica with the shorter queue)."""
        client = ServiceClient(self.url, line, 300)
        with ThreadPoolExecutor(asks) as pool:
            replies = pool.map(lambda _: client.score(list(pixels), [], 5, "batch"), range(asks))
            return {reply["node"] for reply in replies}

    def nodes_within(self, seconds: float, line: str, pixels: np.ndarray) -> int:
        """How many nodes answer, asked until two do or `seconds` pass (the proxy learns of a
        replica a moment after Serve reports it running)."""
        deadline = time.monotonic() + seconds
        nodes = self.nodes(line, pixels)
        while len(nodes) < 2 and time.monotonic() < deadline:
            time.sleep(1)
            nodes = self.nodes(line, pixels)
        return len(nodes)

    def logged(self, text: str, seconds: float) -> bool:
        """Whether the command's output shows `text` within `seconds`."""
        deadline = time.monotonic() + seconds
        while text not in self.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        return text in self.log.read_text()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def token_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray 2.60 authenticates with a token; every process of the test uses it."""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")


def test_a_batch_crosses_the_wire_whole_and_a_bad_body_is_refused() -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (224, 160, 3), dtype=np.uint8) for _ in range(3)]
    got, previous = decode_batch(encode_batch(images, images[:2]))
    assert np.array_equal(got, np.stack(images)) and np.array_equal(previous, got[:2])
    assert decode_batch(encode_batch(images, []))[1].shape == (0, 224, 160, 3)
    with pytest.raises(ValueError, match="not a batch"):
        decode_batch(b"a torn request")
    floats = [image.astype(np.float32) for image in images]
    with pytest.raises(ValueError, match="uint8"):
        decode_batch(encode_batch(floats, []))


def test_plant_yaml_is_checked_and_its_sha256_pins_are_enforced(
    tmp_path: Path, vits14_package: Path, bottle_calibration: Path
) -> None:
    from musc_edge.files import file_sha256
    from musc_edge.runtime.plant import PlantLines, load_plant

    shutil.copytree(vits14_package, tmp_path / "pkg")
    shutil.copy(bottle_calibration, tmp_path / "bottle.cal")
    line = {"model": "pkg", "calibration": "bottle.cal"}  # relative to the file
    plant = write_plant(tmp_path / "plant.yaml", {"bottle": line})
    settings = load_plant(plant)
    assert settings.lines["bottle"].model == tmp_path / "pkg"
    with pytest.raises(
        UsageError,
        match=r"typo.yaml: lines.bottle.calibraton: unknown key \(did you mean calibration\?\)",
    ):
        load_plant(
            write_plant(tmp_path / "typo.yaml", {"bottle": {"model": "pkg", "calibraton": "x"}})
        )
    with pytest.raises(UsageError, match=r"line name 'line 1'"):
        load_plant(write_plant(tmp_path / "name.yaml", {"line 1": line}))
    with pytest.raises(UsageError, match=r"replicas"):
        load_plant(plant, {"replicas": 0})

    sha256 = load_package(tmp_path / "pkg").sha256
    other = "0" * 64
    with pytest.raises(UsageError, match=r"line bottle: model .* plant.yaml pins 0000"):
        PlantLines(
            load_plant(
                write_plant(tmp_path / "p1.yaml", {"bottle": {**line, "model_sha256": other}})
            )
        )
    pins = {"model_sha256": sha256, "calibration_sha256": other}
    with pytest.raises(UsageError, match=r"line bottle: calibration .* plant.yaml pins 0000"):
        PlantLines(load_plant(write_plant(tmp_path / "p2.yaml", {"bottle": {**line, **pins}})))
    pins["calibration_sha256"] = file_sha256(tmp_path / "bottle.cal")
    served = PlantLines(load_plant(write_plant(tmp_path / "p3.yaml", {"bottle": {**line, **pins}})))
    spec = served.line("bottle").spec
    assert (spec.model_sha256, spec.calibration_sha256) == (sha256, pins["calibration_sha256"])
    assert spec.judge["threshold"] > 0 and spec.judge["parts"] == 6
    with pytest.raises(UsageError, match=r"no line 'cap' is served here; the lines are bottle"):
        served.line("cap")


def test_a_station_takes_from_the_service_what_it_would_otherwise_be_given(tmp_path: Path) -> None:
    camera = tmp_path / "camera"
    camera.mkdir()
    station = {"camera_dir": camera, "remote": "http://127.0.0.1:8000"}
    with pytest.raises(UsageError, match="--remote needs --line NAME"):
        load_settings(station)
    with pytest.raises(UsageError, match="--model, --calibration: with --remote the service"):
        load_settings({**station, "line": "bottle", "model": "pkg", "calibration": "c.cal"})
    with pytest.raises(UsageError, match="--mode rolling"):
        load_settings({**station, "line": "bottle", "mode": "rolling"})
    assert load_settings({**station, "line": "bottle"}).model is None


def test_the_plant_scores_several_lines_batches_together_as_each_alone(
    bottle_dir: Path, vits14_package: Path, bottle_calibration: Path
) -> None:
    from musc_edge.runtime.plant import LineBatch, PlantLines, plant_settings

    lines = {"a": {"model": vits14_package, "calibration": bottle_calibration},
             "b": {"model": vits14_package}}  # fmt: skip
    plant = PlantLines(plant_settings({"lines": lines, "engine": "onnxruntime"}, "test"))
    preprocess = load_package(vits14_package).preprocessing()
    paths = [*sorted((bottle_dir / "test" / "good").glob("*.png"))[:6],
             *sorted((bottle_dir / "test" / "broken_large").glob("*.png"))[:3]]  # fmt: skip
    pixels = np.stack([preprocess.resized(cv2.imread(str(path))) for path in paths])
    full = LineBatch("a", pixels[:6], pixels[:0], window=6)
    tail = LineBatch("b", pixels[6:], pixels[:6], window=6)  # below 5 parts: with the last batch

    together = plant.score([full, tail])  # one backbone run over both lines' images
    alone = [plant.score([full])[0], plant.score([tail])[0]]
    for mine, theirs in zip(together, alone, strict=True):
        assert [a.score for a in mine] == pytest.approx([a.score for a in theirs], abs=1e-5)
        assert [a.raw_score for a in mine] == pytest.approx([a.raw_score for a in theirs], abs=1e-5)
    calibrated, tail_answers = together
    assert all(answer.reference_score is not None for answer in calibrated)
    assert [answer.compared for answer in tail_answers] == [8, 8, 8]  # 2 others + 6 before
    assert all(answer.reference_score is None for answer in tail_answers)

    with pytest.raises(
        UsageError, match="images are 112x112 pixels; this line's package takes 224x224"
    ):
        plant.score([LineBatch("a", pixels[:2, :112, :112], pixels[:0])])


def test_a_station_scores_through_the_service_as_run_does_and_waits_while_it_is_down(
    tmp_path: Path, bottle_dir: Path, vits14_package: Path, bottle_calibration: Path, token_auth
) -> None:
    camera = tmp_path / "camera"
    names = bottles(bottle_dir, camera, slice(0, 6), broken=3)
    torn = camera / "torn.png"
    torn.write_bytes((camera / names[0]).read_bytes()[:4000])  # a half-written file
    os.utime(torn, (START + 100, START + 100))
    package = ["--model", str(vits14_package), "--engine", "onnxruntime"]
    local = run_line(camera, tmp_path / "local", *package, "--calibration", str(bottle_calibration))
    assert local.returncode == 0, local.stdout + local.stderr

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    station = ["--remote", url, "--line", "bottle", "--remote-timeout", "120"]
    never = run_line(camera, tmp_path / "never", *station)
    assert never.returncode == 2 and never.stderr.count("\n") == 1, never.stderr
    assert "does not answer" in never.stderr and "never reached it" in never.stderr

    plant = write_plant(
        tmp_path / "plant.yaml",
        {"bottle": {"model": str(vits14_package), "calibration": str(bottle_calibration)}},
        cpus_per_replica=2,
    )
    service = Service(plant, port, tmp_path / "serve.log")
    try:
        served = run_line(camera, tmp_path / "station", *station)
        assert served.returncode == 0, served.stdout + served.stderr
        assert (
            "line bottle scored by" in served.stdout and "calibrated: 6 known-good" in served.stdout
        )
        same_records(by_file(tmp_path / "local"), by_file(tmp_path / "station"))
        manifest = json.loads(
            next((tmp_path / "station" / "batches").glob("*/manifest.json")).read_text()
        )
        assert manifest["service"] == url and manifest["known_good_parts"] == 6
        assert next((tmp_path / "station" / "batches").glob("*/overlays/*.png")).stat().st_size > 0

        # batches sent at once are gathered into one backbone run (@serve.batch)
        preprocess = load_package(vits14_package).preprocessing()
        pixels = [preprocess.resized(cv2.imread(str(camera / name))) for name in names[:5]]
        client = ServiceClient(url, "bottle", 300)
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda _: client.score(pixels, [], 5, "batch"), range(4)))
        assert all(len(reply["answers"]) == 5 for reply in replies)
        assert max(reply["gathered"] for reply in replies) >= 2

        unknown = run_line(camera, tmp_path / "unknown", "--remote", url, "--line", "cap")
        assert unknown.returncode == 2 and "no line 'cap' is served here" in unknown.stderr
    finally:
        service.stop()

    # the service is down: a watching station holds the new parts, says so, records nothing
    later = bottles(bottle_dir, tmp_path / "later", slice(10, 16))
    for name in later:
        shutil.copy(tmp_path / "later" / name, camera / f"later_{name}")
    out = tmp_path / "station"
    before = (out / "results.jsonl").read_text()
    watching = subprocess.Popen(
        [*CLI, "run", "--camera-dir", str(camera), "--out", str(out), "--settle", "0",
         "--batch-size", "5", "--max-wait", "2", *station],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        health: dict = {}
        while time.monotonic() < deadline and "scoring" not in health.get("problems", {}):
            time.sleep(0.5)
            health = json.loads((out / "health.json").read_text())
        assert health["status"] == "degraded", health
        assert "does not answer" in health["problems"]["scoring"]
        assert (out / "results.jsonl").read_text() == before  # nothing recorded, nothing lost
        watching.send_signal(signal.SIGINT)  # stopped meanwhile: it does not wait for it
        output, _ = watching.communicate(timeout=60)
        assert watching.returncode == 0 and "does not answer" in output, output
        assert (out / "results.jsonl").read_text() == before

        watching = subprocess.Popen(watching.args, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)  # fmt: skip
        service = Service(plant, port, tmp_path / "serve.log")  # back: the parts go, in order
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and len(results(out)) < len(names) + 1 + len(later):
                time.sleep(0.5)
        finally:
            service.stop()
        watching.send_signal(signal.SIGINT)
        output, _ = watching.communicate(timeout=120)
    finally:
        if watching.poll() is None:
            watching.kill()
    records = results(out)
    files = [record["file"] for record in records]
    assert sorted(files) == sorted([*names, "torn.png", *(f"later_{n}" for n in later)]), output
    assert json.loads((out / "health.json").read_text())["status"] == "ok"
    assert all(
        r["calibrated"] and r["error"] is None for r in records if r["file"].startswith("later_")
    )


def test_two_stations_served_by_replicas_on_two_nodes_lose_nothing_when_a_node_dies(
    tmp_path: Path, bottle_dir: Path, vits14_package: Path, two_node_cluster: str
) -> None:
    cameras = {"line-a": tmp_path / "a", "line-b": tmp_path / "b"}
    bottles(bottle_dir, cameras["line-a"], slice(0, 12))
    bottles(bottle_dir, cameras["line-b"], slice(8, 16), broken=4)
    package = ["--model", str(vits14_package), "--engine", "onnxruntime"]
    expected = {}
    for line, camera in cameras.items():
        done = run_line(camera, tmp_path / f"{line}-local", *package)
        assert done.returncode == 0, done.stdout + done.stderr
        expected[line] = by_file(tmp_path / f"{line}-local")

    plant = write_plant(
        tmp_path / "plant.yaml",
        {line: {"model": str(vits14_package)} for line in cameras},
        replicas=2, max_replicas_per_node=1, cpus_per_replica=1,
    )  # fmt: skip
    port = free_port()
    service = Service(plant, port, tmp_path / "serve.log", "--address", two_node_cluster)
    stations: dict[str, subprocess.Popen] = {}
    preprocess = load_package(vits14_package).preprocessing()
    camera_a = sorted(cameras["line-a"].iterdir())[:5]
    pixels = np.stack([preprocess.resized(cv2.imread(str(path))) for path in camera_a])
    try:
        assert service.nodes_within(60, "line-a", pixels) == 2  # a replica on each node
        stations = {
            line: station_process(camera, tmp_path / line, service.url, line)
            for line, camera in cameras.items()
        }
        journals = [tmp_path / line / "results.jsonl" for line in cameras]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not any(
            journal.exists() and journal.read_text().count("\n") >= 1 for journal in journals
        ):
            time.sleep(0.05)
        os.kill(worker_raylet(1), signal.SIGKILL)  # the worker node dies mid-run
        written = sum(journal.read_text().count("\n") for journal in journals if journal.exists())
        assert written < 24, "the node died after both stations were done; nothing was at stake"
        for line, station in stations.items():
            output, _ = station.communicate(timeout=600)
            assert station.returncode == 0, output
            records = results(tmp_path / line)
            assert len(records) == len({r["file"] for r in records})  # none twice
            same_records(expected[line], by_file(tmp_path / line))  # none lost, run's scores

        assert service.logged("replicas running: 1 of 2", 60)  # `serve` says so

        ray_start("--address", two_node_cluster, "--num-cpus", "1")  # a node joins again
        assert service.nodes_within(240, "line-a", pixels) == 2  # the lost replica is back
        assert service.logged("replicas running: 2 of 2", 60)
    finally:
        for station in stations.values():
            if station.poll() is None:
                station.kill()
        service.stop()


def test_bench_serve_reports_each_arm_beside_the_local_run(
    tmp_path: Path, bottle_dir: Path, vits14_package: Path, token_auth
) -> None:
    images = tmp_path / "images"
    bottles(bottle_dir, images, slice(0, 5))
    report = tmp_path / "serve.json"
    done = subprocess.run(
        [*CLI, "bench", "serve", "--model", str(vits14_package), "--images", str(images),
         "--count", "5", "--batch-size", "5", "--replicas", "1", "--stations", "1",
         "--rounds", "1", "--cpus-per-replica", "2", "--engine", "onnxruntime",
         "--json", str(report)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    summary = {row["arm"]: row for row in json.loads(report.read_text())["summary"]}
    assert sorted(summary) == ["1 replica(s), 1 station(s)", "local run"]
    for row in summary.values():
        assert row["runs"] == 1 and row["parts"] == 5 and row["parts_per_s"] > 0
        assert row["latency_ms"] > 0
    assert summary["local run"]["vs_local"] == 1.0
    assert "vs local" in done.stdout
