"""A calibrated line judged by its known-good parts alone (docs/verdicts.md): each part scored
on arrival by itself, the same score as the mutual path's bank score, in batch and rolling
mode; the bank a k-centre coreset of the good patches; `--mutual` for the old path. Real
bottle images, the real exported package and calibration, ONNX Runtime."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from musc_edge.calibration import calibrate
from musc_edge.cli import app
from musc_edge.musc import MuSc
from musc_edge.package import load_package
from musc_edge.profile import Profile
from musc_edge.runtime.known_good import KnownGood
from musc_edge.runtime.scoring import known_good_maps
from musc_edge.runtime.settings import LineSettings
from tests.helpers import results

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def camera(bottle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eleven bottle test parts (good and defective mixed) and a half-written file."""
    folder = tmp_path_factory.mktemp("camera")
    images = sorted((bottle_dir / "test").glob("*/*.png"))[::8]
    for index, image in enumerate(images):
        shutil.copyfile(image, folder / f"{index:03d}_{image.parent.name}_{image.name}")
    data = images[0].read_bytes()
    (folder / "torn.png").write_bytes(data[: len(data) // 3])
    return folder


def run_once(camera: Path, out: Path, package: Path, calibration: Path, *options: str) -> None:
    args = ["run", "--camera-dir", str(camera), "--out", str(out), "--model", str(package),
            "--calibration", str(calibration), "--once", "--settle", "0", "--decode-timeout",
            "0.5", "--engine", "onnxruntime", "--batch-size", "4", *options]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def runs(
    camera: Path, vits14_package: Path, bottle_calibration: Path, tmp_path_factory
) -> dict[str, dict[str, dict]]:
    """The same parts through `run`: judged alone in batch and rolling mode, and mutually."""
    out = tmp_path_factory.mktemp("runs")
    arms = {
        "batch": ["--mode", "batch"],
        "rolling": ["--mode", "rolling"],
        "mutual": ["--mode", "batch", "--mutual"],
    }
    records = {}
    for name, options in arms.items():
        run_once(camera, out / name, vits14_package, bottle_calibration, *options)
        records[name] = {r["file"]: {**r, "out": out / name} for r in results(out / name)}
    return records


def test_judged_alone_scores_equal_the_mutual_paths_bank_scores(runs) -> None:
    """Whatever the mode, a part's score and label are those the mutual path judges it by
    (its distance to the known-good parts); only the mutual score is gone."""
    mutual = runs["mutual"]
    assert mutual["torn.png"]["error"]
    for arm in ("batch", "rolling"):
        alone = runs[arm]
        assert sorted(alone) == sorted(mutual)
        assert alone["torn.png"]["error"] and alone["torn.png"]["rejected"]
        for name, record in mutual.items():
            if record["error"] is not None:
                continue
            mine = alone[name]
            assert mine["score"] == pytest.approx(record["score"], abs=1e-5)
            assert mine["reference_score"] == pytest.approx(record["reference_score"], abs=1e-5)
            assert (mine["label"], mine["calibrated"]) == (record["label"], True)
            assert mine["raw_score"] is None and record["raw_score"] is not None
            stages = mine["timings"]["stages_ms"]
            assert set(stages) == {"lnamd", "bank", "maps"}  # no msm, rscin or guard
            assert "msm" in record["timings"]["stages_ms"]
            assert (mine["out"] / mine["overlay"]).is_file()
    labels = {r["label"] for r in mutual.values() if r["error"] is None}
    assert labels == {"normal", "anomalous"}  # the parts test both sides of the threshold


def test_each_part_is_answered_in_its_own_commit(runs) -> None:
    """No batch is waited for: every part is committed alone, in arrival order, and groups
    of --batch-size parts share a batch number (and a manifest), as in rolling mode."""
    for arm in ("batch", "rolling"):
        scored = [r for r in runs[arm].values() if r["error"] is None]
        assert len({r["commit"] for r in scored}) == len(scored)
        assert all(r["commit_lines"] == 1 for r in scored)
        sizes: dict[int, int] = {}
        for record in runs[arm].values():
            sizes[record["batch"]] = sizes.get(record["batch"], 0) + 1
        assert max(sizes.values()) <= 4 and sum(sizes.values()) == 12
    mutual_commits = {r["commit"] for r in runs["mutual"].values() if r["error"] is None}
    assert len(mutual_commits) < 11  # the mutual path commits whole batches


def test_the_heat_of_a_part_judged_alone_is_on_the_calibrations_scale(
    bottle_calibration: Path,
) -> None:
    """The same map gives the same heat whatever else is scored (there is no batch to scale
    with): distance over 1.5 thresholds, clipped to [0, 1]."""
    from musc_edge.calibration import load_calibration
    from musc_edge.runtime.scoring import calibrated_heat

    threshold = load_calibration(bottle_calibration).threshold
    maps = torch.tensor([[[0.0, threshold], [3 * threshold, 0.1]]])
    heat = calibrated_heat(maps, threshold, "batch")
    assert heat[0].ravel().tolist() == pytest.approx([0.0, 2 / 3, 1.0, 0.1 / (1.5 * threshold)])
    assert calibrated_heat(maps, threshold, "image").max() == 1.0


def test_a_batch_judged_alone_equals_its_parts_one_by_one(
    bottle_features, vits14_package: Path
) -> None:
    """Twelve real bottle parts measured together and one at a time against a calibration of
    the first five: the same maps, in fp32 and (within its rounding) bf16."""
    package = load_package(vits14_package)
    musc = MuSc(r_list=(1, 3, 5), grid=package.grid)
    tokens = bottle_features.tokens
    made = calibrate(package, musc, [t[:5] for t in tokens], bottle_features.embeddings[:5],
                     [f"g{i}" for i in range(5)], coreset=1.0)  # fmt: skip
    known = KnownGood(made)
    _, together = known_good_maps(tokens, musc, known, Profile())
    for index in range(len(bottle_features.paths)):
        one = [t[index : index + 1] for t in tokens]
        _, alone = known_good_maps(one, musc, known, Profile())
        # float rounding only: sqrt(2 - 2 cos) magnifies it where a part meets its own patches
        assert torch.allclose(alone[0], together[index], atol=2e-4, rtol=1e-5)
        assert alone[0].max() == pytest.approx(float(together[index].max()), abs=1e-5)
    fast = MuSc(r_list=(1, 3, 5), grid=package.grid, precision="bf16")
    _, rounded = known_good_maps(tokens, fast, KnownGood(made, dtype=torch.bfloat16), Profile())
    # bf16 keeps 8 bits of the cosine: a part's score (its largest distance) moves by < 0.02
    error = (rounded.flatten(1).amax(1) - together.flatten(1).amax(1)).abs().max()
    assert error < 2e-2


def test_the_coreset_keeps_the_fraction_asked_for(bottle_features, vits14_package: Path) -> None:
    """A 10 % coreset holds a tenth of the good patches; its held-out scores are measured
    against it less each part's own patches, so they are no lower than with every patch."""
    package = load_package(vits14_package)
    musc = MuSc(r_list=(1, 3, 5), grid=package.grid)
    tokens, embeddings = [t[:6] for t in bottle_features.tokens], bottle_features.embeddings[:6]
    files = [f"g{i}" for i in range(6)]
    every = calibrate(package, musc, tokens, embeddings, files, coreset=1.0)
    tenth = calibrate(package, musc, tokens, embeddings, files, coreset=0.1)
    patches = 6 * tokens[0].shape[1]
    assert every.summary()["bank_patches"] == patches
    assert tenth.summary()["bank_patches"] == math.ceil(0.1 * patches)
    assert torch.all(tenth.scores >= every.scores - 1e-4)
    capped = calibrate(package, musc, tokens, embeddings, files, bank_patches=50, coreset=1.0)
    assert capped.summary()["bank_patches"] == 50


@pytest.mark.parametrize(
    ("settings", "alone"),
    [
        ({"calibration": "c.cal"}, True),
        ({"calibration": "c.cal", "mutual": True}, False),
        ({}, False),
        ({"items": ["a:0,0,10,10:a.cal", "b:10,0,10,10:b.cal"]}, True),
        ({"items": ["a:0,0,10,10:a.cal", "b:10,0,10,10"]}, False),  # b needs a batch
    ],
)
def test_which_lines_are_judged_alone(tmp_path: Path, settings: dict, alone: bool) -> None:
    line = LineSettings(tmp_path / "camera", tmp_path / "out", **settings)
    assert line.judged_alone is alone


def test_bench_bank_reports_recall_and_time_per_coreset(
    tmp_path: Path, vits14_package: Path, bottle_dir: Path
) -> None:
    """`bench bank` on a small copy of bottle: a row per coreset, each with the recall and
    false rejects at its calibration's threshold and the times per part."""
    root = tmp_path / "data"
    test = sorted((bottle_dir / "test" / "good").glob("*.png"))[:4]
    bad = sorted((bottle_dir / "test" / "broken_large").glob("*.png"))[:4]
    for folder, images in (("good", test), ("broken_large", bad)):
        (root / "bottle" / "test" / folder).mkdir(parents=True)
        for image in images:
            shutil.copy(image, root / "bottle" / "test" / folder / image.name)
    shutil.copytree(
        bottle_dir / "ground_truth" / "broken_large",
        root / "bottle" / "ground_truth" / "broken_large",
    )
    good = root / "bottle" / "train" / "good"
    good.mkdir(parents=True)
    for image in sorted((bottle_dir / "train" / "good").glob("*.png"))[:6]:
        shutil.copy(image, good / image.name)
    out = tmp_path / "bank.json"
    result = CliRunner().invoke(
        app,
        ["bench", "bank", "--model", str(vits14_package), "--root", str(root), "--category",
         "bottle", "--coreset", "0.1", "--coreset", "1", "--engine", "onnxruntime",
         "--json", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert [row["coreset"] for row in rows] == [0.1, 1.0]
    assert rows[0]["bank_patches"] < rows[1]["bank_patches"] == 6 * 256
    for row in rows:
        assert (row["good"], row["defective"]) == (4, 4)
        assert row["auroc"] > 90 and row["features_ms"] > 0 and row["score_ms"] > 0
