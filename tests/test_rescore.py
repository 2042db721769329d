"""`musc-edge rescore` on a real local Ray instance over real bottle images: the records `run`
writes for the same folder, the rejected-part summary, and a resume after a SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import CLI, node_runs, results, worker_raylet

pytest.importorskip("ray", reason="Ray is the cluster extra: pip install -e '.[cluster]'")
pytest.importorskip("pyarrow", reason="Ray Data brings pyarrow")

DAY = 86_400
START = 1_796_000_000  # 2026-11-30 00:53 UTC: the archive's first part


def archive_of(bottle_dir: Path, folder: Path) -> list[str]:
    """Good and broken bottles in two line folders over two days, and one torn file."""
    names = []
    sources = [
        *sorted((bottle_dir / "test" / "good").glob("*.png"))[:5],
        *sorted((bottle_dir / "test" / "broken_large").glob("*.png"))[:4],
    ]
    for index, source in enumerate(sources):
        name = f"line{index % 2 + 1}/{source.parent.name}_{source.name}"
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
        when = START + (index // 5) * DAY + index
        os.utime(target, (when, when))
        names.append(name)
    torn = folder / "line2" / "torn.png"
    torn.write_bytes(sources[0].read_bytes()[:4000])  # a half-written file, the last part
    os.utime(torn, (START + 2 * DAY, START + 2 * DAY))  # (run leaves it out of its batches)
    return [*names, "line2/torn.png"]


def run_once(archive: Path, out: Path, options: list[str]) -> None:
    """`musc-edge run --once` over the archive: the records a re-score must match."""
    line = subprocess.run(
        [*CLI, "run", "--camera-dir", str(archive), "--once", "--settle", "0",
         "--out", str(out), *options],
        capture_output=True, text=True,
    )  # fmt: skip
    assert line.returncode == 0, line.stdout + line.stderr


def batches(records: dict[str, dict]) -> set[frozenset[str]]:
    """The scored files of each batch (a failure's batch number depends on when it failed)."""
    groups: dict[int, set[str]] = {}
    for record in records.values():
        if record["error"] is None:
            groups.setdefault(record["batch"], set()).add(record["file"])
    return {frozenset(group) for group in groups.values()}


def by_file(out: Path) -> dict[str, dict]:
    return {record["file"]: record for record in results(out)}


def test_rescore_writes_runs_records_and_resumes_after_a_kill(
    tmp_path: Path, bottle_dir: Path, vits14_package: Path, bottle_calibration: Path
) -> None:
    archive = tmp_path / "archive"
    names = archive_of(bottle_dir, archive)
    common = ["--model", str(vits14_package), "--calibration", str(bottle_calibration),
              "--batch-size", "3", "--engine", "onnxruntime"]  # fmt: skip
    run_once(archive, tmp_path / "run", common)
    rescore = [*CLI, "rescore", "--archive", str(archive), *common, "--threshold", "0.1"]

    whole = subprocess.run(
        [*rescore, "--out", str(tmp_path / "whole")], capture_output=True, text=True
    )
    assert whole.returncode == 0, whole.stdout + whole.stderr
    expected, got = by_file(tmp_path / "run"), by_file(tmp_path / "whole")
    assert sorted(got) == sorted(expected) == sorted(names)
    assert got["line2/torn.png"]["error"] and expected["line2/torn.png"]["error"]
    assert batches(got) == batches(expected)  # scored with the same companions as by run
    for name, record in expected.items():  # the same scores and verdicts
        mine = got[name]
        assert (mine["label"], mine["error"] is None) == (record["label"], record["error"] is None)
        if record["error"] is None:
            assert mine["score"] == pytest.approx(record["score"], abs=1e-5)
            assert mine["raw_score"] == pytest.approx(record["raw_score"], abs=1e-5)
            assert mine["threshold"] == record["threshold"] and mine["calibrated"]
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    for folder in ("line1", "line2"):
        mine = [r for r in expected.values() if r["file"].startswith(folder + "/")]
        scored = [r for r in mine if r["error"] is None]
        assert summary["folder"][folder] == {
            "parts": len(mine),
            "scored": len(scored),
            "failed": len(mine) - len(scored),
            "rejected": sum(r["label"] == "anomalous" for r in scored),
            "above 0.1": sum(r["score"] > 0.1 for r in scored),
        }
    assert sorted(summary["day"]) == ["2026-11-30", "2026-12-01", "2026-12-02"]
    assert sum(day["parts"] for day in summary["day"].values()) == len(names)
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "whole" / "results.parquet").to_pylist()
    assert {row["file"]: row["score"] for row in table} == {n: r["score"] for n, r in got.items()}

    # an archive given as a list of files, one of them gone: its error record, the rest scored
    listing = tmp_path / "parts.txt"  # paths relative to the list's folder
    chosen = [names[0], names[5], names[7]]
    lines = [f"archive/{name}" for name in [*chosen, "line1/gone.png"]]
    listing.write_text("# a list of archived parts\n" + "\n".join(lines) + "\n")
    listed = subprocess.run(
        [*CLI, "rescore", "--archive", str(listing), *common, "--out", str(tmp_path / "listed")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stdout + listed.stderr
    from_list = {
        name.removeprefix("archive/"): r for name, r in by_file(tmp_path / "listed").items()
    }
    assert sorted(from_list) == sorted([*chosen, "line1/gone.png"])
    assert from_list["line1/gone.png"]["error"] and from_list["line1/gone.png"]["score"] is None
    for name in chosen:  # the calibrated score does not depend on the batch
        assert from_list[name]["score"] == pytest.approx(got[name]["score"], abs=1e-5)

    # killed after its first batch, then started again: every part once, none scored twice
    out = tmp_path / "resumed"
    killed = subprocess.Popen(
        [*rescore, "--out", str(out)], start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    journal = out / "results.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and killed.poll() is None:
        if journal.exists() and journal.read_text().count("\n") >= 1:
            break
        time.sleep(0.02)
    before = journal.read_text()
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    written = before.count("\n")
    assert 0 < written < len(names), "the kill came after the end; nothing to resume"
    again = subprocess.run([*rescore, "--out", str(out)], capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
    resumed = results(out)
    assert journal.read_text().startswith(before)  # what was written stays as it was
    assert sorted(r["file"] for r in resumed) == sorted(names)  # each once
    for record in resumed:  # the verdict is on the known-good distance: batch-independent
        assert record["label"] == expected[record["file"]]["label"]
        if record["error"] is None:
            assert record["score"] == pytest.approx(expected[record["file"]]["score"], abs=1e-5)


def test_rescore_on_a_two_node_cluster_survives_losing_a_node(
    tmp_path: Path, bottle_dir: Path, vits14_package: Path, two_node_cluster: str
) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    for index, source in enumerate(sorted((bottle_dir / "test" / "good").glob("*.png"))[:12]):
        shutil.copy(source, archive / source.name)
        os.utime(archive / source.name, (START + index, START + index))
    common = ["--model", str(vits14_package), "--batch-size", "5", "--engine", "onnxruntime"]
    run_once(archive, tmp_path / "run", common)
    rescore = [*CLI, "rescore", "--archive", str(archive), *common, "--workers", "2",
               "--address", two_node_cluster, "--out", str(tmp_path / "cluster")]  # fmt: skip
    done = subprocess.run(rescore, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "cluster" / "summary.json").read_text())
    assert len(summary["nodes"]) == 2 and sum(summary["nodes"].values()) == 12  # both nodes
    expected = by_file(tmp_path / "run")
    same_as_run(expected, by_file(tmp_path / "cluster"))

    # the worker node dies (its raylet SIGKILLed) once its actor is scoring: Ray starts the
    # actor again on the head, the batch it held is scored again, nothing lost or doubled
    rescore[-1] = str(tmp_path / "node-lost")
    running = subprocess.Popen(rescore, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    journal = tmp_path / "node-lost" / "results.jsonl"
    raylet = worker_raylet(1)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and running.poll() is None:
        if node_runs(raylet, b"BatchScorer"):
            break
        time.sleep(0.02)
    written = journal.read_text().count("\n") if journal.exists() else 0
    os.kill(raylet, signal.SIGKILL)
    assert written < len(expected), "the node died after the end; nothing was at stake"
    output, _ = running.communicate(timeout=600)
    assert running.returncode == 0, output
    records = results(tmp_path / "node-lost")
    assert sorted(r["file"] for r in records) == sorted(expected)  # each part once
    same_as_run(expected, {r["file"]: r for r in records})


def same_as_run(expected: dict[str, dict], got: dict[str, dict]) -> None:
    """The same parts with the same mutual and image scores (uncalibrated, batch by batch)."""
    assert sorted(got) == sorted(expected)
    for name, record in expected.items():
        assert got[name]["raw_score"] == pytest.approx(record["raw_score"], abs=1e-5)
        assert got[name]["score"] == pytest.approx(record["score"], abs=1e-5)
