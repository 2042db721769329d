"""Helpers shared by several test modules: one home each, so no test module imports another.

Plain functions, classes and constants, grouped by what they are for: model packages, the line
on a stand-in backbone, waiting for another thread or process, the CLI and a camera in their own
processes, line configs, loopback network endpoints and test tensors. Fixtures stay in
conftest.py.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import typer

from musc_edge.bench.synthetic import part_image
from musc_edge.cli import app
from musc_edge.images import Preprocess
from musc_edge.musc import MuSc
from musc_edge.package import ONNX_FILE, PARITY_REFERENCE_FILE, ModelPackage
from musc_edge.runtime.addresses import free_port  # noqa: F401 (the tests' helper too)
from musc_edge.runtime.backends import LocalBackend
from musc_edge.runtime.journal import RESULTS_FILE
from musc_edge.runtime.line import Line
from musc_edge.runtime.runners import Runner
from musc_edge.runtime.settings import LineSettings
from musc_edge.size import ImageSize

# --- model packages -------------------------------------------------------------------------------


def write_package(folder: Path, **changes) -> ModelPackage:
    """A package manifest without artifacts: enough for the torch runner and the line."""
    folder.mkdir(parents=True, exist_ok=True)
    package = ModelPackage(
        backbone="dinov2-vits14",
        weights_source="fetched:dinov2-vits14",
        weights_sha256=None,
        image_size=56,
        patch_size=14,
        layers=[3, 6, 9, 12],
        token_dim=384,
        embedding_dim=384,
        preprocess=Preprocess(56, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).to_dict(),
        precision="fp32",
        max_batch=4,
        musc={"r_list": [1, 3, 5], "frac": 0.3, "k_list": [1, 2, 3], "precision": "fp32"},
        versions={},
        folder=folder,
    )
    package = dataclasses.replace(package, **changes)
    package.write()
    return package


def make_package(folder: Path) -> ModelPackage:
    """A small but complete package on disk, its artifacts stand-in bytes."""
    folder.mkdir()
    (folder / ONNX_FILE).write_bytes(b"stand-in graph")
    np.savez(folder / PARITY_REFERENCE_FILE, images=np.zeros((1, 3, 224, 224), np.float32))
    package = write_package(
        folder,
        weights_sha256="ab" * 32,
        image_size=224,
        preprocess=Preprocess(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).to_dict(),
        precision="fp16",
        max_batch=8,
        versions={"torch": "2.15.0", "tensorrt": None},
        onnx_opset=18,
        created="2026-01-01T00:00:00+00:00",
    )
    package.record_artifact(ONNX_FILE)
    package.record_artifact(PARITY_REFERENCE_FILE)
    package.write()
    return package


# --- the line on a stand-in backbone (seconds per test; the real ViT runs elsewhere) --------------

SIZE = 56
PATCH = 14


class PooledColours(Runner):
    """Tokens = patch colour means through a fixed projection: cheap, deterministic."""

    name = "stand-in"

    def load(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.projection = torch.randn(3, 32, generator=generator)

    @property
    def image_size(self) -> ImageSize:  # without a package (an eval's extractor): SIZE
        return ImageSize(SIZE, SIZE) if self.package is None else self.package.size

    def infer_impl(self, batch: np.ndarray):
        pooled = F.avg_pool2d(torch.from_numpy(batch), PATCH).flatten(2).transpose(1, 2)
        tokens = torch.sin(pooled @ self.projection)
        return [tokens, tokens * 2], tokens.mean(dim=1)


def make_line(tmp_path: Path, **settings) -> Line:
    """A line on PooledColours from tmp_path/camera to tmp_path/out (or `out_dir`): one pass,
    no settle time, batches of 4, unless `settings` say otherwise."""
    package = write_package(tmp_path / "pkg", image_size=SIZE, layers=[1, 2])
    out_dir = settings.pop("out_dir", tmp_path / "out")
    options = {"settle": 0.0, "poll": 0.01, "watch": False, "batch_size": 4, **settings}
    line_settings = LineSettings(tmp_path / "camera", out_dir, **options)
    return Line(line_settings, LocalBackend(package, PooledColours(package), MuSc()))


def write_parts(folder: Path, count: int, start: int = 0) -> list[str]:
    """`count` synthetic 64 x 64 parts named part_{index:03d}.png (every fifth defective)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    names = []
    for index in range(start, start + count):
        names.append(f"part_{index:03d}.png")
        cv2.imwrite(str(folder / names[-1]), part_image(64, rng, defect=index % 5 == 4))
    return names


def results(out: Path) -> list[dict]:
    """The records in the out folder's journal, in order; none while it has no journal yet."""
    path = out / RESULTS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_line(tmp_path: Path, timeout: float = 60, **settings) -> list[dict]:
    """One `--once` pass in a thread, so a hang fails the test instead of stalling it."""
    line = make_line(tmp_path, decode_timeout=0.0, **settings)
    worker = threading.Thread(target=line.run, daemon=True)
    worker.start()
    worker.join(timeout)
    assert not worker.is_alive(), "the line hung"
    return results(tmp_path / "out")


# --- waiting for another thread or process --------------------------------------------------------


def wait_until(
    condition: Callable[[], bool], what: str = "the condition", timeout: float = 30.0
) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# --- the CLI and a camera in their own processes --------------------------------------------------

CLI = [sys.executable, "-c", "from musc_edge.cli import app; app()"]

# a camera: `python -c WRITER FOLDER COUNT` writes COUNT parts there, in pieces, renamed or at once
WRITER = """
import sys, time, os
from pathlib import Path
import cv2, numpy as np
from musc_edge.bench.synthetic import part_image
folder, count = Path(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
for index in range(count):
    data = cv2.imencode(".png", part_image(128, rng, index % 6 == 5))[1].tobytes()
    target = folder / f"part_{index:03d}.png"
    if index % 3 == 0:  # in pieces, pausing longer than the settle time
        with open(target, "wb") as handle:
            for piece in (data[:200], data[200:len(data) // 2], data[len(data) // 2:]):
                handle.write(piece)
                handle.flush()
                time.sleep(0.6)
    elif index % 3 == 1:  # written under a temporary name, then renamed
        (folder / (target.name + ".tmp")).write_bytes(data)
        time.sleep(0.2)
        os.replace(folder / (target.name + ".tmp"), target)
    else:
        target.write_bytes(data)
    time.sleep(0.2)
"""


# --- line configs ---------------------------------------------------------------------------------


def run_context(args: list[str]) -> typer.Context:
    """The click context `run` sees for these flags, without running it."""
    command = typer.main.get_command(app).commands["run"]
    return command.make_context("run", args)


def torch_run_config(tmp_path: Path, **options) -> dict:
    """A line config for a real `run --once` of the torch engine on random weights over six
    generated parts (package and parts written under tmp_path), plus `options`."""
    write_package(tmp_path / "pkg", weights_source="random-init", layers=[1, 2])
    write_parts(tmp_path / "camera", 6)
    return {
        "camera_dir": str(tmp_path / "camera"),
        "model": str(tmp_path / "pkg"),
        "out": str(tmp_path / "out"),
        "watch": False,
        "engine": "torch",
        "allow_random_init": True,
        "settle": 0,
        **options,
    }


# --- a Ray cluster of several nodes on this machine -----------------------------------------------


def ray_start(*options: str) -> None:
    """`ray start` with these options: a head, or a node joining one (a process of its own)."""
    done = subprocess.run(["ray", "start", *options], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr


def node_runs(raylet: int, name: bytes) -> bool:
    """Whether a worker process of that raylet's node runs an actor or task called `name`
    (Ray titles its processes `ray::NAME`)."""
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == raylet and name in (entry / "cmdline").read_bytes():
                return True
        except (OSError, ValueError, IndexError):  # not a process, or one that ended
            continue
    return False


def worker_raylet(index: int) -> int:
    """The pid of the raylet of the `index`th node that joined this machine's head (1: first)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # not a process, or one that ended
            continue
        if any(argument.endswith(f"/sockets/raylet.{index}".encode()) for argument in arguments):
            pids.append(int(entry.name))
    assert len(pids) == 1, pids
    return pids[0]


# --- network endpoints on loopback ----------------------------------------------------------------


class Receiver:
    """An HTTP endpoint that answers 500 to the first `failures` requests, then 200."""

    def __init__(self, failures: int = 0) -> None:
        self.requests: list[tuple[dict[str, str], dict]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.requests.append((dict(self.headers), body))
                self.send_response(500 if len(receiver.requests) <= failures else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/api/results?site=7"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def ids(self) -> list[str]:
        return [body["id"] for headers, body in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- test tensors ---------------------------------------------------------------------------------


def unit_vectors(n: int, num_patches: int, dim: int, seed: int = 0) -> torch.Tensor:
    """(n, num_patches, dim) random unit vectors, the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(n, num_patches, dim, generator=generator)
    return torch.nn.functional.normalize(z, dim=-1)


def relative_error(ours: torch.Tensor, exact: torch.Tensor) -> float:
    """|ours - exact| / |exact| over the whole tensor."""
    return float((ours - exact).norm() / exact.norm())
