"""`musc-edge bench`: the report's schema, the sweep, and no speed claim without agreement."""

from __future__ import annotations

import csv
import importlib.util
import json

import pytest
import torch
from typer.testing import CliRunner

from musc_edge.bench.stages import STAGES
from musc_edge.cli import app
from musc_edge.msm import BACKENDS

runner = CliRunner()
STAGE_KEYS = {"median_s", "p95_s", "max_s", "median_per_image_ms"}


def bench(tmp_path, package, *extra: str):
    out = tmp_path / "bench.json"
    table = tmp_path / "bench.csv"
    result = runner.invoke(
        app,
        [
            "bench",
            "--model",
            str(package),
            "--synthetic",
            "--runs",
            "2",
            "--warmup",
            "0",
            "--json",
            str(out),
            "--csv",
            str(table),
            *extra,
        ],
    )
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # whatever the terminal width wrapped
    return json.loads(out.read_text()), list(csv.DictReader(table.open())), said


def check_measurement(summary: dict, batch_size: int) -> None:
    assert summary["batch_size"] == batch_size
    assert summary["runs"] == 2
    assert set(summary["stages"]) == {*STAGES, "total"} - {"bank"}  # bank: calibrated only
    for figures in summary["stages"].values():
        assert set(figures) == STAGE_KEYS
        assert 0 <= figures["median_s"] <= figures["p95_s"] <= figures["max_s"]
    total = summary["stages"]["total"]["median_s"]
    assert summary["images_per_s"] == pytest.approx(batch_size / total)
    assert summary["peak_host_mib"] > 0


@pytest.mark.slow
def test_sweep_report_schema_and_csv(tmp_path, vits14_package) -> None:
    report, rows, output = bench(tmp_path, vits14_package, "--sweep", "4,8")
    assert [entry["ours"]["batch_size"] for entry in report["results"]] == [4, 8]
    for entry, size in zip(report["results"], (4, 8), strict=True):
        check_measurement(entry["ours"], size)
        assert "original" not in entry
    assert {"device", "torch", "threads", "musc_edge"} <= set(report["environment"])
    assert report["msm_precision"] == "fp32"
    auto_choice = "openvino" if importlib.util.find_spec("openvino") else "onnxruntime"
    assert auto_choice in report["engine"]  # the CPU engines' order (docs/cpu-runners.md)
    assert len(rows) == 2 * len(STAGES)  # every stage but bank, plus the total
    assert "N = 8" in output


@pytest.mark.slow
def test_compare_original_claims_speed_only_when_outputs_agree(
    tmp_path, vits14_package, monkeypatch
) -> None:
    report, _, output = bench(tmp_path, vits14_package, "--batch-size", "6", "--compare-original")
    entry = report["results"][0]
    check_measurement(entry["original"], 6)
    assert entry["agreement"]["agree"], entry["agreement"]
    assert entry["agreement"]["max_map_diff"] < 1e-4
    assert set(entry["speedup"]) == {"backbone", "msm", "total"}
    assert "speed-up over the original" in output

    original = BACKENDS["original"]
    monkeypatch.setitem(
        BACKENDS,
        "original",
        lambda z, *args: original(z, *args) + 0.05 * torch.rand(z.shape[:2]),
    )
    report, _, output = bench(tmp_path, vits14_package, "--batch-size", "6", "--compare-original")
    entry = report["results"][0]
    assert not entry["agreement"]["agree"]
    assert "speedup" not in entry
    assert "no speed-up is claimed" in output


def test_bench_needs_an_image_source(tmp_path) -> None:
    result = runner.invoke(app, ["bench", "--model", str(tmp_path)])
    assert result.exit_code == 2
    assert "--synthetic" in result.output


def test_bench_refuses_a_missing_package(tmp_path) -> None:
    result = runner.invoke(app, ["bench", "--model", str(tmp_path / "nothing"), "--synthetic"])
    assert result.exit_code == 2
    assert "not found" in result.output
