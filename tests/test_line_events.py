"""What a line meets that is not a bad pixel: odd names, odd shapes, a folder that moves or
vanishes, a part with nothing to compare it with, an archive inside the camera folder, another
model on the same out folder. Each keeps the line running, records what happened, scores the
rest and resumes after a restart.

The real `Line` loop on real files; the stand-in backbone of tests/helpers.py keeps them
fast, and the real ONNX package runs the CLI and the unjudged-part checks.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from musc_edge.bench.synthetic import part_image
from musc_edge.errors import UsageError
from musc_edge.musc import MuSc
from musc_edge.package import load_package
from musc_edge.runtime.backends import LocalBackend
from musc_edge.runtime.health import HEALTH_FILE
from musc_edge.runtime.line import Line
from musc_edge.runtime.runners import open_runner
from musc_edge.runtime.settings import LineSettings
from musc_edge.runtime.sinks.table import TABLE_FILE
from musc_edge.runtime.verdicts import UNJUDGED
from musc_edge.runtime.view import serve
from tests.conftest import BOTTLE, need
from tests.helpers import (
    CLI,
    PooledColours,
    make_line,
    results,
    run_line,
    wait_until,
    write_package,
    write_parts,
)


def write_part(
    path: Path, seed: int, defect: bool = False, shape: tuple[int, int] = (64, 64)
) -> None:
    """A PNG part of (H, W) `shape`, written through Python (which takes any byte name)."""
    image = part_image(64, np.random.default_rng(seed), defect=defect)
    ok, data = cv2.imencode(".png", cv2.resize(image, shape[::-1]))
    assert ok
    path.write_bytes(data.tobytes())


def table_rows(out: Path) -> list[dict]:
    with open(out / TABLE_FILE, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def test_odd_names_and_shapes_get_their_own_outputs_and_survive_a_restart(
    tmp_path: Path,
) -> None:
    camera = tmp_path / "camera"
    names = write_parts(camera, 6)
    long_name = "L" * 251 + ".png"  # 255 bytes, the most a file system allows
    long_corrupt = "C" * 250 + ".tiff"
    latin1 = os.fsdecode(b"part\xff.png")  # not UTF-8: a byte name from an old gateway
    for seed, name in enumerate((long_name, latin1, "case.png")):
        write_part(camera / name, 100 + seed)
    write_part(camera / "case.PNG", 200, defect=True)
    (camera / long_corrupt).write_bytes(b"II*\0 half a tiff")
    (camera / "sub").mkdir()
    (camera / "sub" / long_corrupt).write_bytes(b"II*\0 another half")  # same name, 2 folders
    write_part(camera / "wide.png", 300, shape=(1, 3000))
    write_part(camera / "tall.png", 301, shape=(3000, 1))

    records = run_line(tmp_path, threshold=0.0)  # threshold 0: every part gets a mask
    out = tmp_path / "out"
    by_name = {("latin1" if r["file_bytes_b64"] else r["file"]): r for r in records}
    assert len(records) == len(names) + 8 and len(by_name) == len(records)
    for name in (long_name, "case.png", "case.PNG", "wide.png", "tall.png", "latin1", *names):
        record = by_name[name]
        assert record["error"] is None and record["score"] is not None, name
        assert (out / record["overlay"]).is_file() and (out / record["mask"]).is_file()
        assert all(len(part.encode()) <= 255 - 40 for part in Path(record["overlay"]).parts)
    # one overlay and mask per file: the suffix case and a shortened name keep them apart
    outputs = [r["mask"] for r in records if r["mask"]]
    assert len(set(outputs)) == len(outputs)
    assert by_name["case.png"]["mask"] != by_name["case.PNG"]["mask"]
    # a name that is not UTF-8: shown escaped, its exact bytes kept
    latin = by_name["latin1"]
    assert latin["file"] == "part\\xff.png"
    assert base64.b64decode(latin["file_bytes_b64"]) == b"part\xff.png"
    # the corrupt long-named files: one record each, copies set aside under names that fit
    for file in (long_corrupt, f"sub/{long_corrupt}"):
        record = by_name[file]
        assert record["error"] and (out / record["rejected"]).read_bytes().startswith(b"II*")
    rows = table_rows(out)
    assert {row["file"] for row in rows} == {r["file"] for r in records}

    # a restart resumes: results.csv is rebuilt, nothing is scored again, new parts are
    write_parts(camera, 2, start=50)
    again = run_line(tmp_path)
    assert len(again) == len(records) + 2 and again[: len(records)] == records
    assert len(table_rows(out)) == len(again)


def watched(tmp_path: Path, **settings) -> tuple[Line, threading.Event, threading.Thread]:
    """A watching line on its own thread; stop it with the event."""
    line = make_line(tmp_path, watch=True, decode_timeout=0.0, **settings)
    stop = threading.Event()
    worker = threading.Thread(target=line.run, args=(stop,), daemon=True)
    worker.start()
    return line, stop, worker


def test_a_camera_link_repointed_by_a_daily_rotation_is_followed(tmp_path: Path) -> None:
    day1, day2 = tmp_path / "day1", tmp_path / "day2"
    first = write_parts(day1, 4)
    (tmp_path / "camera").symlink_to(day1)
    line, stop, worker = watched(tmp_path)
    try:
        out = tmp_path / "out"
        wait_until(lambda: len(results(out)) == 4, "day 1")
        second = write_parts(day2, 4, start=10)
        (tmp_path / "camera.new").symlink_to(day2)
        (tmp_path / "camera.new").replace(tmp_path / "camera")  # atomic, as a rotation does
        wait_until(lambda: len(results(out)) == 8, "day 2 after the rotation")
    finally:
        stop.set()
        worker.join(30)
    assert [r["file"] for r in results(out)] == first + second
    assert line.camera.root == day2.resolve()


def test_a_vanished_camera_folder_is_reported_everywhere_and_taken_up_again(
    tmp_path: Path,
) -> None:
    camera, aside = tmp_path / "camera", tmp_path / "unmounted"
    write_parts(camera, 4)
    out = tmp_path / "out"
    line, stop, worker = watched(tmp_path)
    view = serve(out, "127.0.0.1", 0)
    try:
        wait_until(lambda: len(results(out)) == 4, "the first parts")
        assert health_of(view.url) == (200, "ok")
        camera.rename(aside)
        wait_until(lambda: read_json(out / HEALTH_FILE)["status"] == "degraded", "health")
        assert "camera folder" in read_json(out / HEALTH_FILE)["problems"]["camera"]
        wait_until(lambda: health_of(view.url)[0] == 503, "/healthz 503")
        metrics = get_text(view.url + "metrics")
        assert "musc_input_ok 0" in metrics
        write_parts(aside, 4, start=20)  # parts that came while it was away
        aside.rename(camera)
        wait_until(lambda: len(results(out)) == 8, "parts after the folder returned")
        wait_until(lambda: health_of(view.url) == (200, "ok"), "/healthz ok again")
    finally:
        view.stop()
        stop.set()
        worker.join(30)
    assert line.stats.problem is None


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def health_of(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url + "healthz", timeout=5) as response:
            return response.status, json.loads(response.read())["status"]
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())["status"]


def test_rolling_answers_parts_within_max_wait_after_a_restart(tmp_path: Path) -> None:
    camera = tmp_path / "camera"
    write_parts(camera, 6)
    run_line(tmp_path, mode="rolling")
    out = tmp_path / "out"
    _, stop, worker = watched(tmp_path, mode="rolling", max_wait=0.5)
    try:
        # one part (the warm-up would wait for five), renamed in whole: the line is not
        # settling files here
        (name,) = write_parts(tmp_path / "staging", 1, start=30)
        (tmp_path / "staging" / name).rename(camera / name)
        wait_until(lambda: len(results(out)) == 7, "the answer within max-wait", timeout=15)
    finally:
        stop.set()
        worker.join(30)
    last = results(out)[-1]
    assert last["file"] == "part_030.png" and last["label"] == UNJUDGED
    assert "unjudged: compared with 0 other part(s)" in last["warning"]


def test_a_short_batch_is_compared_with_the_last_batch_and_never_passed_unjudged(
    tmp_path: Path,
) -> None:
    camera = tmp_path / "camera"
    write_parts(camera, 9)  # batches of 4, 4 and a tail of 1
    records = run_line(tmp_path, batch_size=4, threshold=0.5)
    tail = records[-1]
    assert tail["batch"] == 3 and tail["label"] in ("normal", "anomalous")
    assert tail["score"] > 0 and not (tail["warning"] or "").startswith("unjudged")
    # after a restart nothing is in memory: a lone part cannot be judged, and says so
    write_parts(camera, 1, start=40)
    again = run_line(tmp_path, batch_size=4, threshold=0.5)
    lone = again[-1]
    assert lone["label"] == UNJUDGED and "musc-edge calibrate" in lone["warning"]
    rows = table_rows(tmp_path / "out")
    assert rows[-1]["label"] == UNJUDGED


def test_an_archive_subfolder_matching_ignore_is_not_scored_again(tmp_path: Path) -> None:
    camera = tmp_path / "camera"
    names = write_parts(camera, 5)
    run_line(tmp_path, ignore=("done/*",))
    (camera / "done").mkdir()
    for name in names:  # the archive script moves answered parts away
        (camera / name).rename(camera / "done" / name)
    write_parts(camera, 4, start=10)
    records = run_line(tmp_path, ignore=("done/*",))
    assert [r["file"] for r in records[5:]] == [f"part_{n:03d}.png" for n in range(10, 14)]


def test_another_package_on_the_same_out_folder_is_refused(tmp_path: Path) -> None:
    write_parts(tmp_path / "camera", 4)
    records = run_line(tmp_path)
    first = write_package(tmp_path / "pkg", image_size=56, layers=[1, 2])
    assert {r["model_sha256"] for r in records} == {first.sha256}
    other = write_package(tmp_path / "pkg112", image_size=112, layers=[1, 2])
    settings = LineSettings(tmp_path / "camera", tmp_path / "out", watch=False)
    with pytest.raises(UsageError, match="another model package"):
        Line(settings, LocalBackend(other, PooledColours(other), MuSc()))
    make_line(tmp_path).run()  # the lock was released: the right package still runs


def run_cli(args: list[str], prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    command = [*prefix, *CLI, "run", "--once", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_an_unreadable_subfolder_is_a_recorded_failure(
    tmp_path: Path, vits14_package: Path
) -> None:
    """As root (CI) the folder's mode alone would not stop the read: the run drops the
    capabilities that bypass file permissions, as a service user has none."""
    need(BOTTLE.is_dir(), f"shared data missing: no MVTec bottle at {BOTTLE}")
    camera = tmp_path / "camera"
    camera.mkdir()
    for index, source in enumerate(sorted((BOTTLE / "train" / "good").glob("*.png"))[:5]):
        shutil.copy(source, camera / f"good_{index}.png")
    locked = camera / "locked"
    locked.mkdir()
    shutil.copy(camera / "good_0.png", locked / "hidden.png")
    locked.chmod(0)
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        need(shutil.which("setpriv") is not None, "setpriv (util-linux) drops root's file caps")
        drop = "-dac_override,-dac_read_search"
        prefix = ("setpriv", "--bounding-set", drop, "--inh-caps", drop)
    out = tmp_path / "out"
    common = ["--camera-dir", str(camera), "--model", str(vits14_package), "--out", str(out)]
    try:
        result = run_cli([*common, "--engine", "onnxruntime", "--settle", "0"], prefix)
    finally:
        locked.chmod(0o755)
    assert result.returncode == 0, result.stdout + result.stderr
    records = {r["file"]: r for r in results(out)}
    assert "failed 1" in result.stdout
    assert "folder cannot be read (Permission denied)" in records["locked"]["error"]
    assert all(records[f"good_{n}.png"]["score"] is not None for n in range(5))
    # readable again (its ctime changed): its part is scored at the next start
    result = run_cli([*common, "--engine", "onnxruntime", "--settle", "0"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert results(out)[-1]["file"] == "locked/hidden.png"


def test_a_broken_bottle_alone_at_the_end_is_never_passed(
    tmp_path: Path, vits14_package: Path
) -> None:
    """The tail of a run (--once, --max-wait, a stop) is a batch of one: it is judged against
    the batch before it; after a restart, with nothing in memory, it is labelled unjudged."""
    need(BOTTLE.is_dir(), f"shared data missing: no MVTec bottle at {BOTTLE}")
    camera = tmp_path / "camera"
    camera.mkdir()
    for index, source in enumerate(sorted((BOTTLE / "train" / "good").glob("*.png"))[:8]):
        shutil.copy(source, camera / f"good_{index}.png")
    broken = sorted((BOTTLE / "test" / "broken_large").glob("*.png"))
    shutil.copy(broken[0], camera / "z_broken.png")
    package = load_package(vits14_package)
    runner = open_runner(package, "onnxruntime")

    def run(out: str) -> list[dict]:
        settings = LineSettings(camera, tmp_path / out, batch_size=8, watch=False, settle=0.0)
        Line(settings, LocalBackend(package, runner, MuSc.for_package(package))).run()
        return results(tmp_path / out)

    records = run("out")
    tail = records[-1]
    assert tail["file"] == "z_broken.png" and tail["batch"] == 2
    assert tail["label"] == "anomalous", tail
    shutil.copy(broken[1], camera / "zz_broken.png")
    lone = run("out")[-1]
    assert lone["file"] == "zz_broken.png" and lone["label"] == UNJUDGED
