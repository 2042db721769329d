"""Verdicts on one scale: calibration, the history threshold, shifts, streams (verdicts.md)."""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from musc_edge.bench.line_streams import StreamSource, defects_first, run_stream, stream_report
from musc_edge.bench.streams import Part, labelled_split, repeated_fault, write_stream
from musc_edge.calibration import (
    CalibrationError,
    calibrate,
    frr_upper_bound,
    gumbel_threshold,
    load_calibration,
    parts_for_target,
    save_calibration,
)
from musc_edge.msm.nearest import nearest_distances
from musc_edge.musc import MuSc
from musc_edge.runtime.known_good import Joined, KnownGood
from musc_edge.runtime.record import ResultRecord
from musc_edge.runtime.verdicts import CalibratedJudge, HistoryJudge
from tests.helpers import SIZE, PooledColours, make_line, write_package, write_parts


def stand_in_calibration(tmp_path: Path, count: int = 8, aligned: bool = False, **package_changes):
    """A real calibration of generated good parts through the stand-in backbone."""
    from musc_edge.features import extract_features

    package = write_package(tmp_path / "pkg", image_size=SIZE, layers=[1, 2], **package_changes)
    names = write_parts(tmp_path / "good", count)
    paths = [tmp_path / "good" / name for name in names]
    features = extract_features(paths, package.preprocessing(), PooledColours(package))
    result = calibrate(
        package, MuSc(), features.tokens, features.embeddings, names, aligned=aligned
    )
    return package, result


def test_calibration_round_trip_keeps_every_tensor_and_the_threshold(tmp_path: Path) -> None:
    package, made = stand_in_calibration(tmp_path)
    save_calibration(made, tmp_path / "cal.safetensors")
    loaded = load_calibration(tmp_path / "cal.safetensors", package)
    assert loaded.threshold == made.threshold and loaded.files == made.files
    for a, b in zip(loaded.sets, made.sets, strict=True):
        assert torch.equal(a, b) and a.dtype == torch.float16
    assert torch.equal(loaded.scores, made.scores)
    summary = loaded.summary()
    assert summary["parts"] == 8 and summary["score_min"] <= summary["threshold"]


def test_aligned_calibration_judges_distance_and_positional_deviation(tmp_path: Path) -> None:
    package, made = stand_in_calibration(tmp_path, aligned=True)
    save_calibration(made, tmp_path / "cal.safetensors")
    loaded = load_calibration(tmp_path / "cal.safetensors", package)
    assert loaded.aligned and loaded.summary()["aligned"] and loaded.threshold == 1.0
    spread_model = loaded.aligned_spread
    assert spread_model.distance_threshold == made.aligned_spread.distance_threshold
    for a, b in zip(spread_model.spread, made.aligned_spread.spread, strict=True):
        assert torch.equal(a, b) and bool((a > 0).all())
    # the verdict map: the larger of distance and deviation, each over its own threshold
    references = loaded.references()
    sets = [z.float()[:2] for z in loaded.sets]
    distances = [  # against the bank (a coreset of the parts' patches by default)
        nearest_distances(z, references.patches(index).float()) for index, z in enumerate(sets)
    ]
    plain = sum(distances) / len(sets)
    deviation = sum(
        (d - c) / sp
        for d, c, sp in zip(distances, spread_model.centre, spread_model.spread, strict=True)
    ) / len(sets)
    by_hand = torch.maximum(
        plain / spread_model.distance_threshold, deviation / spread_model.deviation_threshold
    )
    maps = MuSc().bank_maps(sets, references)
    assert torch.allclose(maps.flatten(1), by_hand, atol=1e-5)
    unaligned = MuSc().bank_maps(sets, replace(references, aligned_spread=None))
    assert torch.allclose(unaligned.flatten(1), plain, atol=1e-6)
    # held-out scores are on the same scale: each part measured against the others
    assert made.scores.shape == (8,) and float(made.scores.median()) < made.threshold


def test_a_calibration_from_another_package_is_refused(tmp_path: Path) -> None:
    _, made = stand_in_calibration(tmp_path)
    save_calibration(made, tmp_path / "cal.safetensors")
    other = write_package(
        tmp_path / "other",
        image_size=SIZE,
        layers=[1, 2],
        musc={"r_list": [1, 3], "frac": 0.3, "k_list": [1, 2, 3], "precision": "fp32"},
    )
    with pytest.raises(
        CalibrationError,
        match=r"another model \(.*differ from the model package .*musc-edge calibrate",
    ):
        load_calibration(tmp_path / "cal.safetensors", other)


def test_a_damaged_calibration_file_gets_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "cal.safetensors").write_bytes(b"\x10\x00\x00\x00not a header")
    with pytest.raises(CalibrationError, match="not a readable calibration"):
        load_calibration(tmp_path / "cal.safetensors")
    with pytest.raises(CalibrationError, match="not found"):
        load_calibration(tmp_path / "missing.safetensors")


def test_gumbel_threshold_matches_the_quantile_of_gumbel_scores() -> None:
    generator = np.random.default_rng(0)
    scores = torch.from_numpy(generator.gumbel(0.15, 0.01, 20000))
    expected = 0.15 - 0.01 * math.log(-math.log(0.99))
    assert gumbel_threshold(scores, 0.01) == pytest.approx(expected, abs=5e-4)


def test_calibrated_score_of_an_image_is_the_same_in_any_batch(
    bottle_dir: Path, bottle_features
) -> None:
    """The scale test: one image, two batches with different neighbours, one score."""
    from musc_edge.features import extract_features, torch_extractor
    from musc_edge.models import create_backbone

    backbone = create_backbone("dinov2-vits14", 224)
    good = sorted((bottle_dir / "train" / "good").glob("*.png"))[:6]
    bank = extract_features(good, backbone.preprocess, torch_extractor(backbone))
    musc = MuSc()
    known = References_of(musc, bank)
    tokens, embeddings = bottle_features.tokens, bottle_features.embeddings
    first, second = [0, 1, 2, 6, 7], [0, 3, 4, 5, 8, 9, 10, 11]
    a = musc.score([t[first] for t in tokens], embeddings[first], known_good=known)
    b = musc.score([t[second] for t in tokens], embeddings[second], known_good=known)
    assert float(a.bank_scores[0]) == pytest.approx(float(b.bank_scores[0]), abs=1e-6)
    # without a bank the scores are no longer min-max pinned to [0, 1] per batch
    zero_a = musc.score([t[first] for t in tokens], embeddings[first])
    zero_b = musc.score([t[second] for t in tokens], embeddings[second])
    assert float(zero_a.scores.max()) < 1 and float(zero_b.scores.min()) > 0
    assert float(zero_a.scores[0]) == pytest.approx(float(zero_b.scores[0]), rel=0.25)


def References_of(musc: MuSc, features):
    from musc_edge.musc import References

    result = musc.score(features.tokens, features.embeddings)
    return References(musc.pool(features.tokens), features.embeddings, result.raw_scores)


def test_history_judge_ignores_a_burst_and_flags_it_as_a_shift() -> None:
    judge = HistoryJudge()
    normal = [0.20 + 0.002 * (i % 7) for i in range(40)]
    judge.observe(normal, ["normal"] * 40)
    before = judge.threshold([])
    burst = [0.35] * 16
    threshold = judge.threshold(burst)
    assert threshold == before and all(score > threshold for score in burst)
    assert judge.shifted(burst, threshold)
    judge.observe(burst, ["anomalous"] * 16)
    assert judge.threshold([]) == before
    assert not judge.shifted(normal[:16], before)


def test_history_judge_forms_a_threshold_from_single_unlabelled_answers() -> None:
    """Rolling mode commits one answer at a time; first answers that got no label still
    count towards the first threshold, so the line does not stay unlabelled."""
    judge = HistoryJudge()
    first = [0.20, 0.21, 0.19, 0.50, 0.60]
    threshold = judge.threshold(first)
    labels = ["anomalous" if score > threshold else "normal" for score in first]
    assert labels.count("normal") == 3
    judge.observe(first, labels)
    assert judge.threshold([0.205]) is None  # 3 normal + 1: too few for the rule
    judge.observe([0.205], [None])
    assert judge.threshold([0.2]) is not None
    restarted = HistoryJudge(
        ResultRecord(
            "a.png", 1, 1, 1, None, 1, "rolling", score=s, label=lab, threshold_basis="history"
        )
        for s, lab in [*zip(first, labels, strict=True), (0.205, None)]
    )
    assert list(restarted.unjudged) == [0.205]
    assert restarted.threshold([0.2]) == judge.threshold([0.2])


def test_restart_keeps_the_history_threshold(tmp_path: Path) -> None:
    write_parts(tmp_path / "camera", 12)
    line = make_line(tmp_path)
    line.run()
    records = list(line.journal.records())
    assert records and all(not r.calibrated and r.threshold_basis == "history" for r in records)
    kept = line.inspections[0].verdicts.judge.threshold([])
    restarted = make_line(tmp_path)
    assert restarted.inspections[0].verdicts.judge.threshold([]) == kept
    assert list(restarted.inspections[0].verdicts.judge.normal) == list(
        line.inspections[0].verdicts.judge.normal
    )


def test_calibrated_line_judges_every_part_against_the_known_good_parts(tmp_path: Path) -> None:
    _, made = stand_in_calibration(tmp_path)
    save_calibration(made, tmp_path / "cal.safetensors")
    write_parts(tmp_path / "camera", 10, start=20)
    for mode in ("batch", "rolling"):
        line = make_line(
            tmp_path, calibration=tmp_path / "cal.safetensors", mode=mode, out_dir=tmp_path / mode
        )
        line.run()
        records = [r for r in line.journal.records() if r.error is None]
        assert len(records) == 10
        for record in records:
            assert record.calibrated and record.threshold_basis == "calibration"
            assert record.threshold == made.threshold
            assert record.score == record.reference_score
        assert isinstance(line.inspections[0].verdicts.judge, CalibratedJudge)


def test_refresh_lets_only_clearly_normal_parts_join_and_stays_bounded(tmp_path: Path) -> None:
    _, made = stand_in_calibration(tmp_path)
    known = KnownGood(made, refresh=2)
    sets = [z[0].float() for z in made.sets]
    part = Joined("x.png", sets, made.embeddings[0], 0.1)
    assert not known.offer(part, known.margin + 1e-3)
    assert all(known.offer(part, known.margin) for _ in range(3))
    assert len(known) == len(made) + 2 and known.total_joined == 3
    assert len(known.references()) == len(made) + 2
    assert not KnownGood(made).offer(part, 0.0)


def test_streams_keep_their_order_and_truth(tmp_path: Path, bottle_dir: Path) -> None:
    from musc_edge.bench.datasets import load_samples

    samples = load_samples("mvtec", bottle_dir.parent, "bottle")
    grouped = labelled_split(samples, "grouped")
    assert [p.kind for p in grouped[:40]] == ["good"] * 20 + ["broken_large"] * 20
    assert sum(p.label for p in grouped) == 63 and grouped[-1].kind == "contamination"
    first = defects_first(StreamSource(bottle_dir.parent, "bottle"))
    assert first[0].kind == "broken_large" and first[-1].kind == "good"
    good = sorted((bottle_dir / "train" / "good").glob("*.png"))
    parts = repeated_fault(good[1:41], donor=good[0], faulty=10, one_off=2)
    assert sum(p.kind == "repeated" for p in parts) == 10 and len(parts) == 40
    write_stream(parts[:6], tmp_path / "camera")
    written = sorted((tmp_path / "camera").iterdir(), key=lambda p: os.stat(p).st_mtime_ns)
    assert [p.name for p in written] == [p.name for p in parts[:6]]


def test_run_stream_reports_from_the_line_records(tmp_path: Path) -> None:
    package = write_package(tmp_path / "pkg", image_size=SIZE, layers=[1, 2])
    names = write_parts(tmp_path / "src", 10)
    parts = [
        Part(name, int(i % 5 == 4), "drawn" if i % 5 == 4 else "good", tmp_path / "src" / name)
        for i, name in enumerate(names)
    ]
    for overlap in (False, True):
        settings = {"batch_size": 5, "overlap": overlap}
        report = run_stream(parts, package, PooledColours(package), MuSc(), settings)
        assert report["parts"] == 10 and report["defective"] == 2 and report["good"] == 8
        assert report["uncalibrated_records"] == 10
        assert report["by_kind"]["drawn"]["parts"] == 2


def test_bench_line_refuses_an_unknown_overlap(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from musc_edge.cli import app

    arguments = ["bench", "line", "--model", str(tmp_path), "--root", str(tmp_path)]
    result = CliRunner().invoke(app, [*arguments, "--overlap", "maybe"])
    assert result.exit_code == 2 and "--overlap takes auto, on or off" in result.output


def test_stream_report_counts_recall_and_false_rejects() -> None:
    parts = [Part(f"{i}.png", i % 2, "bad" if i % 2 else "good", Path("x")) for i in range(4)]
    labels = ["normal", "anomalous", "anomalous", "normal"]
    records = [
        ResultRecord(f"{i}.png", 1, 1, 1, None, 1, "batch", score=float(i), label=labels[i])
        for i in range(4)
    ]
    report = stream_report(parts, records)
    assert report["recall"] == 50.0 and report["false_rejects"] == 1 and report["good"] == 2


def test_consistency_guard_flags_a_defect_repeating_at_one_place() -> None:
    """Four of sixteen images carry the same pattern at the same patch: MSM's K = 4 closest
    images include the three others that share it, so only the guard can see it."""
    from musc_edge.consistency import consistency_scores, repeated_group
    from musc_edge.msm import mutual_scores

    generator = torch.Generator().manual_seed(0)
    base = F.normalize(torch.randn(16, 1, 32, generator=generator), dim=-1)
    z = F.normalize(base + 0.15 * torch.randn(16, 64, 32, generator=generator), dim=-1)
    piece = F.normalize(torch.randn(32, generator=generator), dim=0)
    faulty = [2, 5, 9, 13]
    z[faulty, 27] = piece
    values, places = consistency_scores(z, 0.3)
    flags = repeated_group(values, places, 8)
    assert flags.nonzero().flatten().tolist() == faulty
    assert set(places[faulty].tolist()) == {27}
    msm = mutual_scores(z, 0.3, 2**24)
    assert msm[faulty, 27].max() < msm.amax(dim=1).median()  # mutual scoring misses it


def test_consistency_guard_ignores_a_one_off_defect() -> None:
    from musc_edge.consistency import consistency_scores, repeated_group

    generator = torch.Generator().manual_seed(1)
    base = F.normalize(torch.randn(16, 1, 32, generator=generator), dim=-1)
    z = F.normalize(base + 0.15 * torch.randn(16, 64, 32, generator=generator), dim=-1)
    z[4, 10] = F.normalize(torch.randn(32, generator=generator), dim=0)
    assert not repeated_group(*consistency_scores(z, 0.3), 8).any()


@pytest.mark.slow
def test_few_shot_eval_uses_train_good_references(bottle_dir: Path, tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from musc_edge.cli import app

    out = tmp_path / "few.json"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--root",
            str(bottle_dir.parent),
            "--category",
            "bottle",
            "--shots",
            "4",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())["categories"]["bottle/4-shot"]
    assert report["shots"] == 4 and report["image"]["auroc"] >= 99.0
    assert report["pixel"]["auroc"] >= 94.0  # the bank map (measured 94.75)
    assert report["pixel_mutual"]["auroc"] >= 97.0  # the mutual map, references voting


def test_references_without_shots_is_refused(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from musc_edge.cli import app

    result = CliRunner().invoke(
        app, ["eval", "--root", str(tmp_path), "--references", str(tmp_path)]
    )
    assert result.exit_code == 2 and "--shots" in " ".join(result.output.split())


def test_line_records_say_repeated_for_a_defect_at_one_place(tmp_path: Path) -> None:
    """Through the whole loop: four parts of twelve with the same mark at the same place."""
    import cv2

    camera = tmp_path / "camera"
    names = write_parts(camera, 12)
    marked = names[1::3]
    for name in marked:
        image = cv2.imread(str(camera / name))
        image[16:32, 32:48] = (40, 200, 255)
        cv2.imwrite(str(camera / name), image)
    line = make_line(tmp_path, batch_size=12)
    line.run()
    flagged = sorted(r.file for r in line.journal.records() if r.repeated)
    assert flagged == sorted(marked)
    assert line.stats.counts.repeated == len(marked)


def test_calibrate_then_run_on_real_bottle_images(
    vits14_package: Path, bottle_dir: Path, tmp_path: Path
) -> None:
    """The README's teach-in, end to end: real weights, ONNX Runtime, real images."""
    import json
    import shutil

    from typer.testing import CliRunner

    from musc_edge.cli import app

    cli = CliRunner()
    cal = tmp_path / "bottle.cal.safetensors"
    good = bottle_dir / "train" / "good"
    made = cli.invoke(
        app,
        [
            *("calibrate", "--model", str(vits14_package), "--good", str(good)),
            *("--parts", "6", "--out", str(cal)),
        ],
    )
    text = " ".join(made.output.split())
    assert made.exit_code == 0, made.output
    assert "6 known-good parts" in text and "threshold" in text and cal.is_file()
    # how sure the threshold is: 6 parts rule out little; 299 would show 1 %
    assert "with 6 parts the false-reject rate is below" in text and "299 good parts" in text
    stored = load_calibration(cal).info["threshold_confidence"]
    assert stored["parts_for_target"] == 299
    assert stored["frr_upper_bound"] >= 1 - 0.05 ** (1 / 6) - 1e-9  # none above: the least
    camera = tmp_path / "camera"
    camera.mkdir()
    picks = sorted((bottle_dir / "test" / "good").glob("*.png"))[:3]
    picks += sorted((bottle_dir / "test" / "broken_large").glob("*.png"))[:3]
    for path in picks:
        shutil.copy(path, camera / f"{path.parent.name}_{path.name}")
    out = tmp_path / "out"
    run = ("run", "--camera-dir", str(camera), "--model", str(vits14_package), "--once")
    ran = cli.invoke(app, [*run, "--settle", "0", "--out", str(out), "--calibration", str(cal)])
    assert ran.exit_code == 0, ran.output
    started = " ".join(ran.output.split())
    assert "calibrated: 6 known-good parts" in started and "at 95 % confidence" in started
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(r["calibrated"] for r in records)
    labels = {r["file"]: r["label"] for r in records}
    assert all(labels[f] == "anomalous" for f in labels if f.startswith("broken_large"))
    missing = str(tmp_path / "none.safetensors")
    wrong = cli.invoke(app, [*run, "--out", str(tmp_path / "other"), "--calibration", missing])
    assert wrong.exit_code == 2 and "musc-edge calibrate" in " ".join(wrong.output.split())

    # the same calibration in eval: its parts are the references, its threshold is reported
    root = small_mvtec(bottle_dir, tmp_path / "mvtec", count=4)
    report_file = tmp_path / "eval.json"
    evaluated = cli.invoke(
        app,
        [
            *("eval", "--root", str(root), "--category", "bottle", "--image-size", "224"),
            *("--calibration", str(cal), "--json", str(report_file)),
        ],
    )
    assert evaluated.exit_code == 0, evaluated.output
    assert "at the calibration's threshold" in " ".join(evaluated.output.split())
    report = json.loads(report_file.read_text())["categories"]["bottle"]
    assert report["shots"] == 6 and report["at_threshold"]["threshold"] == pytest.approx(
        load_calibration(cal).threshold
    )
    assert report["at_threshold"]["recall"] == 100.0 and report["image"]["auroc"] == 100.0
    resized = cli.invoke(
        app,
        [
            *("eval", "--root", str(root), "--category", "bottle", "--image-size", "112"),
            *("--calibration", str(cal)),
        ],
    )
    assert resized.exit_code == 2
    assert "(image_size, preprocess differ from this eval)" in " ".join(resized.output.split())


def small_mvtec(bottle_dir: Path, root: Path, count: int) -> Path:
    """An MVTec-layout copy of a few bottle test images (good and broken_large) and masks."""
    import shutil

    for defect in ("good", "broken_large"):
        folder = root / "bottle" / "test" / defect
        folder.mkdir(parents=True)
        for path in sorted((bottle_dir / "test" / defect).glob("*.png"))[:count]:
            shutil.copy(path, folder / path.name)
            if defect != "good":
                masks = root / "bottle" / "ground_truth" / defect
                masks.mkdir(parents=True, exist_ok=True)
                mask = bottle_dir / "ground_truth" / defect / f"{path.stem}_mask.png"
                shutil.copy(mask, masks / mask.name)
    return root


def test_the_threshold_says_how_sure_it_is() -> None:
    """Clopper-Pearson: none of n held-out parts above the threshold bounds the rate by
    1 - 0.05 ** (1 / n); more parts above it, a higher bound; 299 clean parts show 1 %."""
    assert frr_upper_bound(0, 20) == pytest.approx(1 - 0.05 ** (1 / 20), rel=1e-6)
    bounds = [frr_upper_bound(k, 60) for k in range(5)]
    assert bounds == sorted(bounds) and bounds[4] == pytest.approx(0.1461, abs=1e-3)
    assert frr_upper_bound(0, 299) <= 0.01 < frr_upper_bound(0, 298)
    assert parts_for_target(0.01) == 299 and parts_for_target(0.05) == 59
    assert frr_upper_bound(3, 3) == 1.0
