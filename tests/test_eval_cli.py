"""`musc-edge eval` end to end on the real MVTec bottle images, as the README runs it."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from musc_edge.cli import app

runner = CliRunner()


@pytest.mark.slow
def test_eval_bottle_meets_paper_reference(bottle_dir, dinov2_vits14, tmp_path) -> None:
    out = tmp_path / "out.json"
    result = runner.invoke(
        app,
        [
            "eval",
            "--dataset",
            "mvtec",
            "--root",
            str(bottle_dir.parent),
            "--category",
            "bottle",
            "--backbone",
            "dinov2-vits14",
            "--image-size",
            "224",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    bottle = report["categories"]["bottle"]
    assert bottle["image"]["auroc"] >= 99.5
    assert bottle["pixel"]["auroc"] >= 97.4
    assert bottle["pixel"]["pro"] >= 85.5
    assert len(bottle["images"]) == 83 and not bottle["failures"]
    assert report["config"]["weights"]["source"] == "fetched:dinov2-vits14"
    assert report["config"]["layers"] == [6, 9]


def test_eval_keeps_going_past_a_corrupt_image(tmp_path) -> None:
    """A folder dataset with one corrupt file: scored without it, the failure recorded."""
    rng = np.random.default_rng(0)
    for folder, count in (("good", 5), ("scratch", 2)):
        (tmp_path / folder).mkdir()
        for i in range(count):
            image = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
            cv2.imwrite(str(tmp_path / folder / f"{i}.png"), image)
    (tmp_path / "scratch" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "out.json"
    result = runner.invoke(
        app,
        [
            "eval",
            "--dataset",
            "folder",
            "--root",
            str(tmp_path),
            "--backbone",
            "ViT-B-32",
            "--image-size",
            "64",
            "--random-init",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    category = next(iter(json.loads(out.read_text())["categories"].values()))
    assert len(category["images"]) == 7
    assert [f["file"].endswith("broken.png") for f in category["failures"]] == [True]
    assert "not a decodable image" in category["failures"][0]["error"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--root", "/nonexistent/place"], "does not exist"),
        (["--root", ".", "--dataset", "kitti"], "unknown dataset"),
        (["--root", ".", "--msm-precision", "fp8"], "fp8"),
    ],
)
def test_eval_bad_input_gives_one_line_error(args, message) -> None:
    result = runner.invoke(app, ["eval", *args, "--random-init"])
    assert result.exit_code == 2
    assert message in result.output


def test_empty_dataset_folder_is_a_clear_error(tmp_path) -> None:
    result = runner.invoke(
        app,
        [
            "eval",
            "--dataset",
            "folder",
            "--root",
            str(tmp_path),
            "--random-init",
            "--backbone",
            "ViT-B-32",
        ],
    )
    assert result.exit_code == 2
    assert "no images" in result.output


def test_help_lists_the_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("eval", "weights"):
        assert command in result.output
