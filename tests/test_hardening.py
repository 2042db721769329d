"""Hostile inputs against the line: whatever lands in the camera folder, the good images are
scored, the bad file gets exactly one record, and nothing from outside the folder leaks out.

Built on the stand-in backbone of tests/helpers.py (seconds per test); the real ONNX
package runs the SIGKILL and signal tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from musc_edge.bench.synthetic import part_image
from musc_edge.images import ImageReadError, probe_image
from musc_edge.package import PackageError, load_package
from musc_edge.runtime.journal import Journal
from musc_edge.runtime.lock import OutFolderBusy, OutFolderLock
from musc_edge.runtime.outputs import REJECTED_DIR
from tests.helpers import (
    CLI,
    WRITER,
    make_line,
    results,
    run_line,
    wait_until,
    write_package,
    write_parts,
)


def by_file(records: list[dict]) -> dict[str, dict]:
    files = [r["file"] for r in records]
    assert len(files) == len(set(files)), "a file was answered twice"
    return {r["file"]: r for r in records}


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_claiming(width: int, height: int) -> bytes:
    """A few hundred bytes whose header claims width x height RGB pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + png_chunk(b"IEND", b"")
    )


def test_symlinks_out_of_the_folder_are_refused_and_never_copied(tmp_path: Path) -> None:
    camera = tmp_path / "camera"
    names = write_parts(camera, 6)
    outside = tmp_path / "elsewhere"
    write_parts(outside, 1, start=50)
    (camera / "leak.png").symlink_to("/etc/passwd")
    (camera / "outside.png").symlink_to(outside / "part_050.png")
    (camera / "inside.png").symlink_to(camera / names[0])
    records = by_file(run_line(tmp_path))
    assert set(records) == {*names, "leak.png", "outside.png", "inside.png"}
    for name in ("leak.png", "outside.png"):
        assert "outside the camera folder; not read" in records[name]["error"]
        assert records[name]["rejected"] is None and records[name]["sha256"] is None
    assert not (tmp_path / "out" / REJECTED_DIR).exists()
    assert records["inside.png"]["score"] is not None  # a link within the folder is an image
    assert all(records[name]["score"] is not None for name in names)


def test_a_header_claiming_ten_gigapixels_is_one_record(tmp_path: Path) -> None:
    camera = tmp_path / "camera"
    names = write_parts(camera, 6)
    (camera / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    records = by_file(run_line(tmp_path))
    assert "--max-pixels" in records["bomb.png"]["error"]
    assert all(records[name]["score"] is not None for name in names)


def test_images_above_max_pixels_are_refused_before_decoding(tmp_path: Path) -> None:
    camera = tmp_path / "camera"
    names = write_parts(camera, 6)  # 64 x 64
    big = part_image(200, np.random.default_rng(1), defect=False)
    cv2.imwrite(str(camera / "big.png"), big)
    records = by_file(run_line(tmp_path, max_pixels=100 * 100))
    assert "200 x 200 pixels is above the limit of 10000" in records["big.png"]["error"]
    assert all(records[name]["score"] is not None for name in names)


def test_large_images_are_decoded_reduced_but_masked_at_their_own_size(tmp_path: Path) -> None:
    camera = tmp_path / "camera"
    write_parts(camera, 5)
    large = cv2.resize(part_image(256, np.random.default_rng(2), True), (2400, 2200))
    cv2.imwrite(str(camera / "large.jpg"), large)
    records = by_file(run_line(tmp_path, threshold=0.0))
    mask = cv2.imread(str(tmp_path / "out" / records["large.jpg"]["mask"]), cv2.IMREAD_GRAYSCALE)
    assert mask.shape == (2200, 2400)


def test_special_files_get_a_record_without_being_opened(tmp_path: Path) -> None:
    camera = tmp_path / "camera"
    names = write_parts(camera, 6)
    os.mkfifo(camera / "pipe.png")
    (camera / "zero.png").symlink_to("/dev/zero")
    records = by_file(run_line(tmp_path, timeout=30))
    assert "not a regular file (FIFO)" in records["pipe.png"]["error"]
    assert "outside the camera folder" in records["zero.png"]["error"]
    assert all(records[name]["score"] is not None for name in names)


def test_files_sharing_a_stem_keep_their_own_overlay_and_mask(tmp_path: Path) -> None:
    camera = tmp_path / "camera"
    write_parts(camera, 5)
    rng = np.random.default_rng(3)
    cv2.imwrite(str(camera / "part.png"), part_image(64, rng, defect=True))
    cv2.imwrite(str(camera / "part.tif"), part_image(64, rng, defect=False))
    records = by_file(run_line(tmp_path, threshold=0.0, batch_size=8))
    png, tif = records["part.png"], records["part.tif"]
    assert png["batch"] == tif["batch"]
    assert png["overlay"] != tif["overlay"] and png["mask"] != tif["mask"]
    assert (tmp_path / "out" / png["mask"]).is_file() and (tmp_path / "out" / tif["mask"]).is_file()


def test_out_equal_to_the_camera_folder_is_refused(tmp_path: Path) -> None:
    write_parts(tmp_path / "camera", 2)
    with pytest.raises(ValueError, match="is the camera folder"):
        make_line(tmp_path, out_dir=tmp_path / "camera" / ".." / "camera")


def test_a_second_run_on_one_out_folder_is_refused_naming_the_holder(tmp_path: Path) -> None:
    write_parts(tmp_path / "camera", 4)
    first = make_line(tmp_path)
    with pytest.raises(OutFolderBusy, match=rf"pid {os.getpid()} on .* since 20"):
        make_line(tmp_path)
    first.run()
    make_line(tmp_path).run()  # released when the first run ended
    assert len(results(tmp_path / "out")) == 4


def test_a_lock_left_by_a_killed_run_does_not_block_the_restart(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom pathlib import Path\n"
            "from musc_edge.runtime.lock import OutFolderLock\n"
            "lock = OutFolderLock(Path(sys.argv[1]))\nprint('held', flush=True)\ntime.sleep(60)",
            str(tmp_path / "out"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutFolderBusy, match=f"pid {holder.pid}"):
            OutFolderLock(tmp_path / "out")
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    finally:
        holder.kill()
    OutFolderLock(tmp_path / "out").release()


def test_a_multi_page_tiff_says_which_page_was_scored(tmp_path: Path) -> None:
    camera = tmp_path / "camera"
    write_parts(camera, 5)
    rng = np.random.default_rng(4)
    pages = [part_image(64, rng, defect=False), part_image(64, rng, defect=True)]
    assert cv2.imwritemulti(str(camera / "pages.tiff"), pages)
    assert probe_image(camera / "pages.tiff").frames == 2
    records = by_file(run_line(tmp_path))
    assert "TIFF file of 2 pages: page 1 was scored" in records["pages.tiff"]["warning"]


def test_a_file_replaced_in_place_with_its_mtime_restored_is_scored_again(tmp_path: Path):
    camera = tmp_path / "camera"
    names = write_parts(camera, 5)
    make_line(tmp_path).run()
    target = camera / names[0]
    before = target.stat()
    data = target.read_bytes()
    replacement = bytearray(data)
    replacement[-20] ^= 0xFF  # same size, other content
    target.write_bytes(bytes(replacement))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert target.stat().st_mtime_ns == before.st_mtime_ns
    make_line(tmp_path).run()
    answers = [r for r in results(tmp_path / "out") if r["file"] == names[0]]
    assert len(answers) == 2 and answers[0]["sha256"] != answers[1]["sha256"]


def test_a_metadata_change_alone_does_not_score_a_file_twice(tmp_path: Path) -> None:
    camera = tmp_path / "camera"
    names = write_parts(camera, 5)
    make_line(tmp_path).run()
    os.chmod(camera / names[0], 0o600)  # new ctime, same content
    make_line(tmp_path).run()
    assert [r["file"] for r in results(tmp_path / "out")].count(names[0]) == 1


@pytest.mark.parametrize(("field", "value"), [("image_size", "abc"), ("layers", "3,6")])
def test_a_manifest_with_a_wrong_type_is_refused(tmp_path: Path, field: str, value) -> None:
    import json

    package = write_package(tmp_path / "pkg")
    manifest = package.path("musc.json")
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, field: value}))
    with pytest.raises(PackageError, match=rf"field {field} = '{value}'"):
        load_package(tmp_path / "pkg")


def mutations(data: bytes, rng: np.random.Generator, count: int) -> list[bytes]:
    """Truncations, bit flips, and overwritten header bytes of one valid file."""
    out = []
    for index in range(count):
        blob = bytearray(data)
        kind = index % 3
        if kind == 0:
            blob = blob[: int(rng.integers(0, len(blob)))]
        elif kind == 1:
            for position in rng.integers(0, len(blob), size=int(rng.integers(1, 16))):
                blob[position] ^= 1 << int(rng.integers(0, 8))
        else:
            start = int(rng.integers(0, min(64, len(blob))))
            blob[start : start + 4] = rng.integers(0, 256, size=4, dtype=np.uint8).tobytes()
        out.append(bytes(blob))
    return out


def test_decoder_fuzz_every_mutated_file_gets_one_record(tmp_path: Path) -> None:
    camera = tmp_path / "camera"
    names = write_parts(camera, 6)
    rng = np.random.default_rng(7)
    image = part_image(64, rng, defect=False)
    written = []
    for suffix in (".png", ".jpg", ".bmp", ".tif"):
        ok, encoded = cv2.imencode(suffix, image)
        assert ok
        for index, blob in enumerate(mutations(encoded.tobytes(), rng, 60)):
            name = f"fuzz_{suffix[1:]}_{index:03d}{suffix}"
            (camera / name).write_bytes(blob)
            written.append(name)
    records = by_file(run_line(tmp_path, timeout=300, batch_size=32))
    assert set(records) == {*names, *written}
    assert all(records[name]["score"] is not None for name in names)
    failed = sum(1 for name in written if records[name]["error"])
    print(f"\n{len(written)} mutated files: {failed} refused, {len(written) - failed} scored")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_disk_is_one_line_and_the_restart_loses_nothing(
    tmp_path: Path, vits14_package: Path
) -> None:
    camera, small = tmp_path / "camera", tmp_path / "small"
    write_parts(camera, 12)
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(small)])
    if mounted.returncode != 0:
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        line = [
            *CLI, "run", "--camera-dir", str(camera), "--model", str(vits14_package), "--once",
            "--settle", "0", "--batch-size", "4", "--engine", "onnxruntime",
        ]  # fmt: skip
        full = subprocess.run([*line, "--out", str(small / "out")], capture_output=True, text=True)
        assert full.returncode == 2, full.stdout + full.stderr
        errors = [text for text in full.stderr.splitlines() if text.strip()]
        assert len(errors) == 1 and "No space left on device" in errors[0], full.stderr
        assert "Traceback" not in full.stderr
        shutil.copytree(small / "out", tmp_path / "out", ignore=shutil.ignore_patterns(".*lock"))
    finally:
        subprocess.run(["umount", str(small)], check=False)
    again = subprocess.run([*line, "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    files = [record.file for record in Journal(tmp_path / "out").records()]
    assert sorted(files) == sorted(p.name for p in camera.iterdir())


def test_sigterm_while_the_model_loads_exits_0(tmp_path: Path, vits14_package: Path) -> None:
    write_parts(tmp_path / "camera", 3)
    args = ["run", "--camera-dir", str(tmp_path / "camera"), "--model", str(vits14_package)]
    process = subprocess.Popen(
        [*CLI, *args, "--engine", "onnxruntime"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().startswith("loading ")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
    finally:
        process.kill()


def test_probe_refuses_what_is_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(ImageReadError, match="not a decodable image header"):
        probe_image(tmp_path / "text.png")


@pytest.mark.slow
def test_ten_sigkills_during_a_watched_run_lose_nothing_and_score_nothing_twice(
    tmp_path: Path, vits14_package: Path
) -> None:
    camera, out, count = tmp_path / "camera", tmp_path / "out", 30
    camera.mkdir()
    line = [
        *CLI, "run", "--camera-dir", str(camera), "--model", str(vits14_package), "--out",
        str(out), "--batch-size", "3", "--settle", "0.4", "--poll", "0.05", "--max-wait", "2",
        "--engine", "onnxruntime",
    ]  # fmt: skip
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(camera), str(count)])
    started = [writer]
    rng = np.random.default_rng(11)
    try:
        for _ in range(10):
            started.append(subprocess.Popen(line, stdout=subprocess.DEVNULL))
            time.sleep(float(rng.uniform(3.0, 7.0)))  # loading, scoring, writing: anywhere
            started[-1].send_signal(signal.SIGKILL)
            started[-1].wait()
        log = tmp_path / "last.log"
        with open(log, "w") as handle:
            last = subprocess.Popen(line, stdout=handle)
        started.append(last)
        assert writer.wait(timeout=300) == 0
        wait_until(lambda: len(results(out)) >= count, "an answer for every part", timeout=300)
        # once it says "loading", its SIGTERM handler is on
        wait_until(lambda: "loading" in log.read_text(), "the last run to load", timeout=120)
        last.send_signal(signal.SIGTERM)
        assert last.wait(timeout=60) == 0
    finally:
        for process in started:
            process.kill()
    files = [r["file"] for r in results(out)]
    assert sorted(files) == [f"part_{index:03d}.png" for index in range(count)]
    table = (out / "results.csv").read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in table] == files
