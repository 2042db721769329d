"""`tools/device_check.sh`, the GPU check for the first lent device: its dry run here (CUDA
steps skipped with their commands, the same command lines run small on the CPU), and its
report writer on numbers shaped like a GPU run's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "device_check.sh"
REPORT = REPO / "tools" / "device_report.py"
CUDA_STEPS = {
    "cuda-tests": ["pytest", "tests/test_msm.py", "cuda or gpu"],
    "msm-bf16": ["bench msm", "--device cuda", "--n 200", "--grid 37", "--dim 1024", "bf16"],
    "e2e-package": ["device_package.py", "--backbone auto", "--image-size 518"],
    "e2e-bench": ["musc-edge bench", "--batch-size 200", "--engine torch", "--compare-original"],
    "msm-fp32": ["bench msm", "--device cuda", "--sets 12", "--msm-precision fp32"],
}
CPU_STEPS = ("environment", "cpu-pytest", "cpu-msm", "cpu-package", "cpu-e2e")


@pytest.mark.slow  # 45-60 s on the loaded 2-vCPU VM: six Python processes importing torch
def test_dry_run_skips_cuda_steps_and_runs_the_cpu_smoke(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    for name in ("DEVICE_CHECK_STEPS", "DEVICE_CHECK_E2E_FLAGS", "DEVICE_CHECK_BUDGET_S"):
        env.pop(name, None)
    result = subprocess.run(
        ["bash", str(SCRIPT), "--dry", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "device-check.json",
        "device-check.log",
        "device-check.md",
    ]
    assert not list(tmp_path.glob("device-check.*"))  # the work folder is removed
    report = json.loads((out / "device-check.json").read_text())
    assert report["mode"] == "dry" and report["finished"]
    steps = {step["name"]: step for step in report["steps"]}
    assert set(steps) == {*CUDA_STEPS, *CPU_STEPS}
    for name, words in CUDA_STEPS.items():
        assert steps[name]["status"] == "skipped" and steps[name]["reason"] == "--dry"
        command = steps[name]["command"].replace("\\ ", " ")
        assert all(word in command for word in words), command
    for name in CPU_STEPS:
        assert steps[name]["status"] == "passed", steps[name]
    assert steps["environment"]["data"]["musc_edge_from"].endswith("/py/musc_edge")
    assert steps["cpu-pytest"]["summary"]["failures"] == 0
    assert steps["cpu-msm"]["summary"]["precision"] == "bf16"
    assert steps["cpu-msm"]["data"]["shape"] == {"n": 8, "grid": 8, "dim": 64, "sets": 2}
    assert steps["cpu-e2e"]["summary"]["outputs_agree"]
    assert all(row["met"] is None for row in report["targets"])
    table = (out / "device-check.md").read_text()
    assert table.count("would run: `") == len(CUDA_STEPS)
    assert "| cpu-e2e | passed |" in table


def report_tool(*args: str) -> None:
    subprocess.run([sys.executable, str(REPORT), *args], check=True)


def record(steps: Path, name: str, data: Path) -> None:
    report_tool(
        *("record", "--steps", str(steps), "--name", name, "--status", "passed"),
        *("--ms", "1500", "--rc", "0", "--command=x", f"--data={data}"),
    )


def test_report_reads_gpu_numbers_against_the_targets(tmp_path: Path) -> None:
    """Numbers shaped like `bench msm --json` and `bench --json` on the GPU, made up."""
    msm = tmp_path / "msm.json"
    shape = {"n": 200, "grid": 37, "dim": 1024, "sets": 12}
    msm.write_text(
        json.dumps(
            {
                "shape": shape,
                "msm_precision": "bf16",
                "backend": "op",
                "ours_median": 1.5,
                "original_median": 45.0,
                "speedup": 30.0,
                "max_abs_diff": 1e-3,
            }
        )
    )
    stages = ("decode", "backbone", "lnamd", "msm", "rscin", "write")

    def run(per_image_ms: dict[str, float]) -> dict:
        figures = {**per_image_ms, "total": sum(per_image_ms.values())}
        return {
            "batch_size": 200,
            "stages": {k: {"median_per_image_ms": v} for k, v in figures.items()},
        }

    ours = run(dict(zip(stages, (4.0, 3.0, 0.5, 6.0, 0.1, 2.0), strict=True)))
    original = run(dict(zip(stages, (4.0, 20.0, 1.0, 200.0, 0.1, 2.0), strict=True)))
    e2e = tmp_path / "e2e.json"
    agreement = {"agree": True, "max_map_diff": 1e-3}
    e2e.write_text(
        json.dumps(
            {
                "engine": "torch",
                "msm_precision": "bf16",
                "results": [{"ours": ours, "original": original, "agreement": agreement}],
            }
        )
    )
    steps = tmp_path / "steps"
    record(steps, "msm-bf16", msm)
    record(steps, "e2e-bench", e2e)
    out = tmp_path / "out"
    report_tool("write", "--steps", str(steps), "--out", str(out), "--mode", "gpu", "--final")
    report = json.loads((out / "device-check.json").read_text())
    summary = {step["name"]: step["summary"] for step in report["steps"]}
    flop = 12 * 200 * 199 / 2 * 1369**2 * 1024 * 2  # each pair once, as bench msm counts
    assert summary["msm-bf16"]["tflops"] == pytest.approx(flop / 1.5 / 1e12, abs=0.01)
    assert summary["e2e-bench"]["ours_ms_per_image"] == pytest.approx(15.6)
    assert summary["e2e-bench"]["ours_compute_ms_per_image"] == pytest.approx(9.6)
    assert summary["e2e-bench"]["ratio"] == pytest.approx(227.1 / 15.6, abs=0.01)
    assert [row["met"] for row in report["targets"]] == [True, False, False]  # 611 TFLOP/s
    table = (out / "device-check.md").read_text()
    assert "| msm-bf16 | passed | 1.5 |" in table
    assert "| end to end ms per image, N = 200 | 15.6 | <= 15 | no |" in table
