"""The report of `tools/device_check.sh`: step records in, one JSON and one markdown table out.

    python tools/device_report.py env --json FILE            # environment facts (imports torch)
    python tools/device_report.py record --steps DIR --name NAME --status passed ...
    python tools/device_report.py write --steps DIR --out OUT_DIR --mode gpu

`record` and `write` import neither torch nor musc_edge, so the report is written even when
the package cannot be imported on the device: that failure is then what the report says.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

BF16_MATMUL_TFLOPS = 790.0  # an 8192^3 bf16 matmul through torch on the lent H200
NEAR_MATMUL_RATE = 0.7  # "near the matmul rate", as this report reads it
E2E_RATIO_TARGET = 20.0  # end to end, original / ours, same GPU, N = 200
E2E_MS_TARGET = 15.0  # ms per image end to end at N = 200
COMPUTE_STAGES = ("backbone", "lnamd", "bank", "msm", "rscin")  # decode and write are host work
VERSIONED = ("torch", "triton", "timm", "open_clip_torch", "onnxruntime", "pydantic", "numpy")


def environment() -> dict:
    """What produced the numbers: GPU, driver, Python and library versions."""
    facts: dict = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "versions": {},
    }
    for name in VERSIONED:
        try:
            facts["versions"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            facts["versions"][name] = None
    if shutil.which("nvidia-smi"):
        query = "--query-gpu=name,driver_version,memory.total"
        smi = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        facts["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    else:
        facts["nvidia_smi"] = None
    import torch

    facts["torch_cuda"] = torch.version.cuda
    facts["cuda_available"] = torch.cuda.is_available()
    if facts["cuda_available"]:
        properties = torch.cuda.get_device_properties(0)
        facts["gpu"] = {
            "name": properties.name,
            "capability": f"{properties.major}.{properties.minor}",
            "memory_gib": round(properties.total_memory / 2**30, 1),
            "multiprocessors": properties.multi_processor_count,
        }
    try:
        import musc_edge.runtime

        facts["musc_edge_from"] = str(Path(musc_edge.runtime.__file__).parent.parent)
    except Exception as error:  # the report says why the package cannot run here
        facts["musc_edge_from"] = f"import failed: {type(error).__name__}: {error}"
    return facts


def record(args: argparse.Namespace) -> None:
    """One step's outcome as STEPS/NN-NAME.json, numbered in the order the steps ran."""
    steps = Path(args.steps)
    steps.mkdir(parents=True, exist_ok=True)
    number = len(list(steps.glob("*.json")))
    entry = {
        "name": args.name,
        "status": args.status,
        "seconds": round(args.ms / 1000, 2),
        "command": args.command,
        "rc": args.rc,
        "reason": args.reason or None,
        "data_file": args.data or None,
        "log_tail": tail(args.log) if args.log and args.status != "passed" else None,
    }
    (steps / f"{number:02d}-{args.name}.json").write_text(json.dumps(entry, indent=2))


def tail(path: str, lines: int = 25) -> str | None:
    """The end of a step's output, kept in the report for steps that did not pass."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    return "\n".join(text.splitlines()[-lines:])


def load_data(path: str | None) -> dict | str | None:
    """A step's own output: JSON as a dict, JUnit XML as counts, else None."""
    if not path or not Path(path).is_file():
        return None
    if path.endswith(".xml"):
        return junit_counts(Path(path))
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        return f"unreadable JSON: {error}"


def junit_counts(path: Path) -> dict:
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def summarise(data: object) -> dict:
    """The key numbers of one step's data, by the shape of the data."""
    if not isinstance(data, dict):
        return {}
    if "passed" in data and "tests" in data:
        return {key: data[key] for key in ("passed", "failures", "errors", "skipped")}
    if "ours_median" in data:
        return msm_summary(data)
    if "results" in data:
        return e2e_summary(data)
    if "backbone" in data and "image_size" in data:
        return {key: data[key] for key in ("backbone", "image_size", "layers", "chosen_because")}
    if "cuda_available" in data:
        gpu = data.get("gpu") or {}
        return {
            "gpu": gpu.get("name") or "none",
            "torch": data["versions"].get("torch"),
            "triton": data["versions"].get("triton"),
            "cuda_available": data["cuda_available"],
        }
    return {}


def msm_summary(data: dict) -> dict:
    """TFLOP/s of our MSM counting each image pair once, as `bench msm` does."""
    shape = data["shape"]
    pairs = shape["n"] * (shape["n"] - 1) / 2
    flop = shape["sets"] * pairs * (shape["grid"] ** 2) ** 2 * shape["dim"] * 2
    tflops = flop / data["ours_median"] / 1e12
    summary = {
        "precision": data["msm_precision"],
        "backend": data["backend"],
        "ours_s": round(data["ours_median"], 4),
        "original_s": round(data["original_median"], 4),
        "speedup": round(data["speedup"], 2),
        "tflops": round(tflops, 2),
        "max_abs_diff": data["max_abs_diff"],
    }
    if data["msm_precision"] == "bf16":
        summary["of_bf16_matmul_rate"] = round(tflops / BF16_MATMUL_TFLOPS, 3)
    return summary


def e2e_summary(data: dict) -> dict:
    """Per image: total and compute-only (no decode, no writing), ours and original."""
    entry = data["results"][0]
    ours = entry["ours"]
    summary = {
        "engine": data.get("engine"),
        "msm_precision": data.get("msm_precision"),
        "batch_size": ours["batch_size"],
        "ours_ms_per_image": round(ours["stages"]["total"]["median_per_image_ms"], 2),
        "ours_compute_ms_per_image": round(compute_ms(ours), 2),
        "ours_backbone_ms_per_image": round(ours["stages"]["backbone"]["median_per_image_ms"], 2),
        "ours_msm_ms_per_image": round(ours["stages"]["msm"]["median_per_image_ms"], 2),
        "peak_gpu_allocated_mib": ours.get("peak_gpu_allocated_mib"),
    }
    if "original" in entry:
        original = entry["original"]
        total = original["stages"]["total"]["median_per_image_ms"]
        summary["original_ms_per_image"] = round(total, 2)
        summary["original_compute_ms_per_image"] = round(compute_ms(original), 2)
        summary["ratio"] = round(total / ours["stages"]["total"]["median_per_image_ms"], 2)
        summary["compute_ratio"] = round(compute_ms(original) / compute_ms(ours), 2)
        summary["outputs_agree"] = entry["agreement"]["agree"]
        summary["max_map_diff"] = entry["agreement"]["max_map_diff"]
    return summary


def compute_ms(run: dict) -> float:
    return sum(
        run["stages"][stage]["median_per_image_ms"]
        for stage in COMPUTE_STAGES
        if stage in run["stages"]
    )


def targets(steps: list[dict]) -> list[dict]:
    """The issue's targets against what was measured; met is None where nothing was."""
    by_name = {step["name"]: step["summary"] for step in steps}
    msm = by_name.get("msm-bf16", {}).get("tflops")
    e2e = by_name.get("e2e-bench", {})
    ratio, per_image = e2e.get("ratio"), e2e.get("ours_ms_per_image")
    near = NEAR_MATMUL_RATE * BF16_MATMUL_TFLOPS
    rows = [
        (
            "MSM bf16 TFLOP/s (N 200, grid 37, dim 1024)",
            msm,
            f"near the bf16 matmul rate {BF16_MATMUL_TFLOPS:.0f} (read as >= {near:.0f})",
            None if msm is None else msm >= near,
        ),
        (
            "end to end, original / ours (same GPU)",
            ratio,
            f">= {E2E_RATIO_TARGET:.0f}x, outputs agreeing",
            None if ratio is None else ratio >= E2E_RATIO_TARGET and e2e.get("outputs_agree"),
        ),
        (
            "end to end ms per image, N = 200",
            per_image,
            f"<= {E2E_MS_TARGET:.0f}",
            None if per_image is None else per_image <= E2E_MS_TARGET,
        ),
    ]
    return [
        {"target": name, "measured": value, "wanted": wanted, "met": met}
        for name, value, wanted, met in rows
    ]


def write(args: argparse.Namespace) -> None:
    """OUT/device-check.json (every step with its data) and OUT/device-check.md (the table)."""
    steps = []
    for path in sorted(Path(args.steps).glob("*.json")):
        step = json.loads(path.read_text())
        data_file = step.pop("data_file")
        try:
            step["data"] = load_data(data_file)
            step["summary"] = summarise(step["data"])
        except Exception as error:  # one step's broken output must not cost the whole report
            step["data"] = None
            step["summary"] = {"unreadable": f"{data_file}: {type(error).__name__}: {error}"}
        steps.append(step)
    report = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mode": args.mode,
        "finished": args.final,
        "steps": steps,
        "targets": targets(steps),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "device-check.json").write_text(json.dumps(report, indent=2))
    (out / "device-check.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    lines = [
        f"# Device check ({report['mode']}, {report['created']})",
        "",
        "| step | status | seconds | key numbers |",
        "| --- | --- | --- | --- |",
    ]
    for step in report["steps"]:
        status = step["status"] + (f": {step['reason']}" if step["reason"] else "")
        summary = step["summary"].items()
        numbers = ", ".join(f"{key} {format_value(value)}" for key, value in summary)
        if step["status"] == "skipped":
            numbers = f"would run: `{step['command']}`"
        lines.append(f"| {step['name']} | {status} | {step['seconds']:.1f} | {numbers} |")
    lines += ["", "| target | measured | wanted | met |", "| --- | --- | --- | --- |"]
    for row in report["targets"]:
        met = {True: "yes", False: "no", None: "not measured"}[row["met"]]
        lines.append(
            f"| {row['target']} | {format_value(row['measured'])} | {row['wanted']} | {met} |"
        )
    if not report["finished"]:
        lines += ["", "The check did not finish: this table holds the steps done so far."]
    return "\n".join(lines) + "\n"


def format_value(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2e}" if value and abs(value) < 1e-2 else f"{value:g}"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    env = commands.add_parser("env", help="environment facts as JSON")
    env.add_argument("--json", required=True)
    rec = commands.add_parser("record", help="record one step")
    rec.add_argument("--steps", required=True)
    rec.add_argument("--name", required=True)
    rec.add_argument("--status", required=True, choices=("passed", "failed", "timeout", "skipped"))
    rec.add_argument("--ms", type=int, default=0)
    rec.add_argument("--rc", type=int, default=None)
    rec.add_argument("--command", dest="shell_command", default="")
    rec.add_argument("--reason", default="")
    rec.add_argument("--data", default="")
    rec.add_argument("--log", default="")
    out = commands.add_parser("write", help="write device-check.json and device-check.md")
    out.add_argument("--steps", required=True)
    out.add_argument("--out", required=True)
    out.add_argument("--mode", required=True)
    out.add_argument("--final", action="store_true", help="the last write: all steps are done")
    args = parser.parse_args()
    if args.command == "env":
        Path(args.json).write_text(json.dumps(environment(), indent=2))
    elif args.command == "record":
        args.command = args.shell_command
        record(args)
    else:
        write(args)


if __name__ == "__main__":
    main()
