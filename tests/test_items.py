"""Several inspection items per image: a real line on two boxes of KolektorSDD's commutators,
each calibrated on its own box, with a fault painted into one of them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from musc_edge.cli import app
from musc_edge.errors import UsageError
from musc_edge.runtime.counts import Counts
from musc_edge.runtime.inspections import worst
from musc_edge.runtime.record import ItemResult
from musc_edge.runtime.settings import load_settings
from musc_edge.runtime.verdicts import HistoryJudge
from tests.conftest import SHARED_DATA, need
from tests.helpers import CLI, results, run_line, write_parts

COMMUTATOR = SHARED_DATA / "kolektorsdd" / "commutator"
BOXES = {"upper": "0,0,500,500", "lower": "0,620,500,500"}  # every commutator is 1240+ tall


def result(name: str, score: float, threshold: float | None, label: str | None) -> ItemResult:
    return ItemResult(
        name, None, score, score, None, label, threshold, "fixed", False, False, False, False
    )


def test_the_worst_item_decides_by_label_then_by_its_own_threshold() -> None:
    calm = result("a", 5.0, 10.0, "normal")  # half its threshold
    close = result("b", 0.9, 1.0, "normal")  # 90 % of a threshold in other units
    assert worst([calm, close]) == 1
    assert worst([close, result("c", 0.1, None, "unjudged")]) == 1
    assert worst([calm, close, result("d", 1.1, 1.0, "anomalous")]) == 2


def test_items_are_named_boxes_and_exclude_the_lines_own_region(tmp_path: Path) -> None:
    base = {"camera_dir": str(tmp_path / "cam"), "model": "pkg"}
    settings = load_settings({**base, "items": ["cap:0,0,40,30:cap.cal", "label:0,30,40,50"]})
    assert settings.items["cap"].region == (0, 0, 40, 30)
    assert settings.items["cap"].calibration == Path("cap.cal")
    assert settings.items["label"].calibration is None
    with pytest.raises(UsageError, match="give each item its own region"):
        load_settings({**base, "items": ["cap:0,0,4,4"], "region": "0,0,8,8"})
    with pytest.raises(UsageError, match=r"items\.cap\.region: Field required"):
        load_settings({**base, "items": {"cap": {"calibration": "cap.cal"}}})
    with pytest.raises(UsageError, match="item name 'a cap'"):
        load_settings({**base, "items": ["a cap:0,0,4,4"]})


def painted(image: np.ndarray, top: int) -> np.ndarray:
    """A bright scratch across the part, starting `top` pixels down."""
    faulty = image.copy()
    cv2.line(faulty, (150, top), (350, top + 120), 255, 9)
    return faulty


def test_a_line_judges_each_item_and_takes_the_worst(tmp_path: Path, vits14_package: Path) -> None:
    need(COMMUTATOR.is_dir(), f"shared data missing: no KolektorSDD commutator at {COMMUTATOR}")
    config = tmp_path / "line.yaml"
    config.write_text(
        "items:\n"
        + "".join(
            f"  {name}: {{region: '{box}', calibration: {name}.safetensors}}\n"
            for name, box in BOXES.items()
        )
    )  # the calibrations' paths are relative to the file
    calibrate = [
        *CLI, "calibrate", "--model", str(vits14_package), "--good",
        str(COMMUTATOR / "train" / "good"), "--parts", "6", "--config", str(config),
    ]  # fmt: skip
    done = subprocess.run(calibrate, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(item lower, region 0,620,500,500)" in done.stdout  # each item on its own box
    calibrations = {name: tmp_path / f"{name}.safetensors" for name in BOXES}
    camera = tmp_path / "camera"
    camera.mkdir()
    goods = sorted((COMMUTATOR / "test" / "good").iterdir())[:4]
    for path in goods:
        shutil.copy(path, camera / path.name)
    part = cv2.imread(str(goods[1]), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(camera / "zz_lower_fault.png"), painted(part, 700))
    cv2.imwrite(str(camera / "zz_short.png"), part[:900])  # holds the upper box only
    run = [
        *CLI, "run", "--camera-dir", str(camera), "--model", str(vits14_package), "--once",
        "--settle", "0", "--batch-size", "8", "--engine", "onnxruntime",
    ]  # fmt: skip
    done = subprocess.run(
        [*run, "--config", str(config), "--out", str(tmp_path / "items")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "item upper: calibrated" in done.stdout and "item lower: calibrated" in done.stdout
    assert "anomalous items: " in done.stdout  # the status line counts them per item
    records = {record["file"]: record for record in results(tmp_path / "items")}
    assert len(records) == 6
    assert records["zz_short.png"]["error"].startswith("item lower: region 0,620,500,500")
    fault = records["zz_lower_fault.png"]
    upper, lower = fault["items"]
    assert (upper["name"], lower["name"]) == ("upper", "lower")
    assert lower["label"] == "anomalous" and upper["label"] == "normal"
    assert fault["label"] == "anomalous" and fault["item"] == "lower"
    assert fault["score"] == lower["score"] and fault["threshold"] == lower["threshold"]
    assert upper["threshold"] != lower["threshold"]  # each item its own calibration
    # the upper box holds the same pixels as the untouched part: the same score
    untouched = records[goods[1].name]["items"][0]
    assert abs(upper["score"] - untouched["score"]) < 1e-4
    for record in records.values():
        if record["error"] is None:
            assert [item["region"] for item in record["items"]] == [
                [0, 0, 500, 500],
                [0, 620, 500, 500],
            ]
    # the mask is in the file's own pixels: the scratch is inside the lower box, nothing above
    mask = cv2.imread(str(tmp_path / "items" / fault["mask"]), cv2.IMREAD_GRAYSCALE)
    assert mask.shape == part.shape
    assert mask[700:820, 150:350].any() and not mask[:620].any()
    counts = Counts()
    for record in records.values():
        counts.add(record)
    anomalous = sum(
        item["label"] == "anomalous" for r in records.values() for item in r["items"] or ()
    )
    assert (
        counts.items_anomalous["lower"] >= 1 and sum(counts.items_anomalous.values()) == anomalous
    )
    overlay = cv2.imread(str(tmp_path / "items" / fault["overlay"]))
    assert overlay.shape[:2] == (500, 500)  # the lower item's, the one that failed
    # one item alone scores its box exactly as the line's --region does
    alone = subprocess.run(
        [
            *run, "--region", BOXES["upper"], "--calibration", str(calibrations["upper"]),
            "--out", str(tmp_path / "upper"),
        ],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert alone.returncode == 0, alone.stdout + alone.stderr
    single = {record["file"]: record for record in results(tmp_path / "upper")}
    assert single[goods[1].name]["items"] is None
    assert single["zz_short.png"]["error"] is None  # it holds the upper box
    for name, record in records.items():
        if record["error"] is None:
            assert abs(single[name]["score"] - record["items"][0]["score"]) < 1e-4


def test_each_item_keeps_its_own_threshold_history_across_a_restart(tmp_path: Path) -> None:
    """Uncalibrated items: each threshold comes from that item's own earlier verdicts, read
    back from the journal at the next start."""
    items = {"left": {"region": "0,0,32,64"}, "right": {"region": "32,0,32,64"}}
    write_parts(tmp_path / "camera", 12)
    first = run_line(tmp_path, items=items, batch_size=6)
    assert len(first) == 12 and all(r["threshold_basis"] == "history" for r in first)
    write_parts(tmp_path / "camera", 6, start=12)
    later = run_line(tmp_path, items=items, batch_size=6)[12:]
    assert len(later) == 6
    for index, name in enumerate(items):
        judge = HistoryJudge(ItemResult(**record["items"][index]) for record in first)
        scores = [record["items"][index]["score"] for record in later]
        assert {record["items"][index]["name"] for record in later} == {name}
        for record in later:
            assert record["items"][index]["threshold"] == pytest.approx(judge.threshold(scores))


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        ("items:\n  cap: {region: '0,0,4,4'}\n", [], "item cap names no calibration file"),
        ("mode: batch\n", [], "has no items; give --out FILE"),
        ("items:\n  cap: {region: '0,0,4'}\n", [], "items.cap.region: region '0,0,4'"),
        ("items:\n  cap: {region: '0,0,4,4'}\n", ["--out", "x.cal"], "give --out FILE, or"),
    ],
)
def test_calibrate_config_refuses_what_it_cannot_write(
    tmp_path: Path, content: str, extra: list[str], message: str
) -> None:
    config = tmp_path / "line.yaml"
    config.write_text(content)
    given = ["calibrate", "--model", "pkg", "--good", str(tmp_path), "--config", str(config)]
    result = CliRunner().invoke(app, [*given, *extra])
    assert result.exit_code != 0 and message in result.output


@pytest.mark.parametrize("mode", ["rolling", "batch"])
def test_items_answer_in_lockstep_in_either_mode(tmp_path: Path, mode: str) -> None:
    """Every part gets one record holding every item, in both schedulers, with each item's
    own scores (the right half of these parts differs from the left)."""
    items = {"left": {"region": "0,0,32,64"}, "right": {"region": "32,0,32,64"}}
    write_parts(tmp_path / "camera", 11)
    records = run_line(tmp_path, items=items, mode=mode, batch_size=4)
    assert len(records) == 11 and len({r["file"] for r in records}) == 11
    for record in records:
        left, right = record["items"]
        assert (left["name"], right["name"]) == ("left", "right")
        assert record["item"] in ("left", "right") and left["score"] != right["score"]
        chosen = left if record["item"] == "left" else right
        assert (record["score"], record["label"]) == (chosen["score"], chosen["label"])
