"""Non-square inputs that keep the camera's aspect: the size, the pooling on a rows x columns
grid, and a real tall package (KolektorSDD's 500 x 1260 commutators) through export,
calibrate and the line."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import cv2
import pytest
import torch
import torch.nn.functional as F

from musc_edge.errors import UsageError
from musc_edge.lnamd import lnamd as plain_lnamd
from musc_edge.lnamd_op import lnamd as lnamd_op
from musc_edge.musc import MuSc, MuScInputError
from musc_edge.size import ImageSize
from tests.conftest import SHARED_DATA, need
from tests.helpers import CLI, results

COMMUTATOR = SHARED_DATA / "kolektorsdd" / "commutator"


def test_image_size_reads_one_number_or_width_by_height() -> None:
    assert ImageSize.parse(224) == ImageSize(224, 224) == ImageSize.parse("224")
    tall = ImageSize.parse("224x560")  # WIDTHxHEIGHT, as cameras state it
    assert (tall.height, tall.width) == (560, 224)
    assert ImageSize.parse([560, 224]) == tall  # as packages store it: [height, width]
    assert tall.to_json() == [560, 224] and ImageSize(224, 224).to_json() == 224
    assert str(tall) == "224x560" and tall.grid(14) == (40, 16)
    for bad in ("wide", "0x5", "224x", True):
        with pytest.raises(UsageError):
            ImageSize.parse(bad)
    with pytest.raises(UsageError, match="try 224x560"):
        ImageSize.parse("230x565").check_multiple(14, "dinov2-vits14")


def test_pooling_on_a_wide_grid_matches_a_direct_window_mean() -> None:
    rows, columns, dim = 3, 5, 8
    tokens = torch.randn(2, rows * columns, dim)
    plain = plain_lnamd(tokens, (1, 3), (rows, columns))
    for ours, ref in zip(lnamd_op(tokens, (1, 3), (rows, columns)), plain, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # patch (row 2, column 0): its 3 x 3 window holds rows 1-2 and columns 0-1 (zero padding)
    maps = F.layer_norm(tokens.transpose(1, 2).reshape(2, dim, rows, columns), (dim, rows, columns))
    window = maps[:, :, 1:3, 0:2].sum(dim=(2, 3)) / 9
    torch.testing.assert_close(plain[1][:, 2 * columns], F.normalize(window, dim=-1))


def test_musc_keeps_the_grid_in_its_maps_and_refuses_tokens_of_another_size() -> None:
    tokens = [torch.randn(6, 4 * 7, 16) for _ in range(2)]
    embeddings = F.normalize(torch.randn(6, 16), dim=-1)
    result = MuSc(r_list=(1, 3), grid=(4, 7)).score(tokens, embeddings)
    assert result.patch_maps.shape == (6, 4, 7)
    with pytest.raises(MuScInputError, match="do not fill a 5 x 7 patch grid"):
        MuSc(grid=(5, 7)).score(tokens, embeddings)


@pytest.fixture(scope="module")
def tall_package(tmp_path_factory, dinov2_vits14) -> Path:
    """dinov2-vits14 exported at 112 x 280 (8 x 20 patches): the commutators' aspect."""
    need(COMMUTATOR.is_dir(), f"shared data missing: no KolektorSDD commutator at {COMMUTATOR}")
    folder = tmp_path_factory.mktemp("tall") / "dinov2-vits14-112x280"
    args = ["export", "--backbone", "dinov2-vits14", "--image-size", "112x280", "--out"]
    done = subprocess.run([*CLI, *args, str(folder)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return folder


def test_a_tall_package_runs_calibrated_on_real_commutators(
    tmp_path: Path, tall_package: Path
) -> None:
    manifest = json.loads((tall_package / "musc.json").read_text())
    assert manifest["image_size"] == [280, 112] and manifest["grid"] == [20, 8]
    assert manifest["tensors"]["images"] == [-1, 3, 280, 112]
    calibration = tmp_path / "commutator.safetensors"
    calibrate = [
        *CLI, "calibrate", "--model", str(tall_package), "--good",
        str(COMMUTATOR / "train" / "good"), "--parts", "8", "--out", str(calibration),
    ]  # fmt: skip
    done = subprocess.run(calibrate, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    camera = tmp_path / "camera"
    camera.mkdir()
    chosen = [
        *sorted((COMMUTATOR / "test" / "good").iterdir())[:3],
        *sorted((COMMUTATOR / "test" / "defective").iterdir())[:3],
    ]
    for path in chosen:
        shutil.copy(path, camera / f"{path.parent.name}_{path.name}")
    run = [
        *CLI, "run", "--camera-dir", str(camera), "--model", str(tall_package), "--once",
        "--settle", "0", "--batch-size", "6", "--engine", "onnxruntime",
        "--calibration", str(calibration), "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    done = subprocess.run(run, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    records = results(tmp_path / "out")
    assert len(records) == 6 and all(r["calibrated"] and r["error"] is None for r in records)
    for record in records:
        image = cv2.imread(str(camera / record["file"]), cv2.IMREAD_GRAYSCALE)
        overlay = cv2.imread(str(tmp_path / "out" / record["overlay"]))
        # the tall map drawn over the whole part, at the part's aspect (previews are bounded)
        assert max(overlay.shape[:2]) == min(1024, max(image.shape))
        assert overlay.shape[0] / overlay.shape[1] == pytest.approx(
            image.shape[0] / image.shape[1], rel=0.01
        )
