"""A region of interest: the box parsed and checked, and a real calibrated line on the upper
500 x 500 of KolektorSDD's commutators, with an image the box does not fit."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from musc_edge.errors import UsageError
from musc_edge.region import Region, RegionOutsideImage
from tests.conftest import SHARED_DATA, need
from tests.helpers import CLI, results

COMMUTATOR = SHARED_DATA / "kolektorsdd" / "commutator"
BOX = "0,0,500,500"


def test_a_region_is_x_y_width_height_inside_the_image() -> None:
    assert Region.parse("10,20,30,40") == Region(10, 20, 30, 40) == Region.parse([10, 20, 30, 40])
    image = np.arange(100 * 80).reshape(100, 80)
    assert Region(10, 20, 30, 40).crop(image).shape == (40, 30)
    assert Region(10, 20, 30, 40).crop(image)[0, 0] == image[20, 10]
    with pytest.raises(RegionOutsideImage, match="does not fit this 80 x 100 image"):
        Region(60, 0, 30, 10).crop(image)
    for bad in ("1,2,3", "a,b,c,d", "0,0,0,5", "-1,0,5,5"):
        with pytest.raises(UsageError, match="x,y,width,height"):
            Region.parse(bad)


def test_a_line_on_a_region_of_real_commutators(tmp_path: Path, vits14_package: Path) -> None:
    need(COMMUTATOR.is_dir(), f"shared data missing: no KolektorSDD commutator at {COMMUTATOR}")
    calibration = tmp_path / "upper.safetensors"
    calibrate = [
        *CLI, "calibrate", "--model", str(vits14_package), "--good",
        str(COMMUTATOR / "train" / "good"), "--parts", "6", "--region", BOX,
        "--out", str(calibration),
    ]  # fmt: skip
    done = subprocess.run(calibrate, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    camera = tmp_path / "camera"
    camera.mkdir()
    for path in sorted((COMMUTATOR / "test" / "good").iterdir())[:3]:
        shutil.copy(path, camera / path.name)
    first = sorted((COMMUTATOR / "test" / "good").iterdir())[0]
    part = cv2.imread(str(first), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(camera / "zz_small.png"), part[:400, :400])  # a smaller camera frame
    frame = np.zeros((2100, 2100), np.uint8)  # a large frame: decoded whole, not reduced
    frame[: part.shape[0], : part.shape[1]] = part
    cv2.imwrite(str(camera / "zz_large.png"), frame)
    run = [
        *CLI, "run", "--camera-dir", str(camera), "--model", str(vits14_package), "--once",
        "--settle", "0", "--batch-size", "4", "--engine", "onnxruntime",
        "--calibration", str(calibration),
    ]  # fmt: skip
    whole = subprocess.run([*run, "--out", str(tmp_path / "whole")], capture_output=True, text=True)
    assert whole.returncode != 0 and "calibrate again with the line's --region" in whole.stderr
    assert "Traceback" not in whole.stderr
    done = subprocess.run(
        [*run, "--region", BOX, "--out", str(tmp_path / "out")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    records = {record["file"]: record for record in results(tmp_path / "out")}
    assert len(records) == 5
    assert "does not fit this 400 x 400 image" in records["zz_small.png"]["error"]
    # the same pixels in the box, from the part's own file and from the large frame
    same = records["zz_large.png"]["score"] - records[first.name]["score"]
    assert abs(same) < 1e-4
    scored = [record for name, record in records.items() if name != "zz_small.png"]
    assert all(r["error"] is None and r["calibrated"] for r in scored)
    manifest = json.loads(next((tmp_path / "out").rglob("manifest.json")).read_text())
    assert manifest["region"] == [0, 0, 500, 500]  # each batch's manifest names the box
    for record in scored:  # the overlay shows the region, not the whole frame
        assert cv2.imread(str(tmp_path / "out" / record["overlay"])).shape[:2] == (500, 500)
