"""Nothing leaves the device: the line, on OpenVINO (the default engine) and on ONNX Runtime,
resolves no name, connects nowhere off the machine and writes nothing under $HOME.

Each run is a real `musc-edge run --once` subprocess under `strace -f` (which follows the
children a library forks: OpenVINO's telemetry posts from one), with HOME an empty folder
and without the variables that would hide the libraries' telemetry (CI markers, which both
libraries check, and the opt-outs `musc_edge.offline` sets, which this process may
have set already), so the child has to turn telemetry off itself.

Evidence, chosen because it does not depend on the test machine's network:
- connect/sendto/sendmsg to an AF_INET or AF_INET6 address that is not loopback, or to
  port 53 anywhere (a resolver on 127.0.0.53 included): traffic, seen even where the
  network is down, since the call is made before it fails.
- an open of /etc/resolv.conf: glibc's resolver reads it at the start of every name lookup
  that may go to DNS, before any packet is sent, so a lookup shows even on a machine with
  no resolver and where nscd or systemd-resolved would take the query over a unix socket.
  A run of the line has no name to look up (no sinks, no --serve).
- anything under the empty HOME afterwards (OpenVINO wrote ~/intel/stats and
  ~/intel/openvino_ga_cid, ONNX Runtime ~/.cache/Microsoft/DeveloperTools/.onnxruntime/).
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from musc_edge.offline import ENVIRONMENT
from musc_edge.package import ONNX_FILE, ModelPackage
from tests.helpers import CLI, write_package

ENGINES = ("openvino", "onnxruntime")
# network calls, and openat (open where it exists) for /etc/resolv.conf
TRACED = "trace=%network,openat,?open"
# What the child must not inherit: the CI markers OpenVINO's and ONNX Runtime's telemetry
# check (either would hide it), the opt-outs the fix sets, and the XDG folders (so that a
# cache lands under the test's HOME)
HIDING = (
    "CI", "TF_BUILD", "JENKINS_URL", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI", "TRAVIS",
    "CODEBUILD_BUILD_ID", "BUILDKITE", "TEAMCITY_VERSION", "APPVEYOR", "BITBUCKET_BUILD_NUMBER",
    "ORT_RUNNING_UNIT_TESTS", "DISABLE_TELEMETRY", *ENVIRONMENT,
    "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME",
)  # fmt: skip
SENDS = re.compile(r"^\d+\s+(connect|sendto|sendmsg|sendmmsg)\(")
ADDRESS = re.compile(r'inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6, "([^"]+)"')
PORT = re.compile(r"sin6?_port=htons\((\d+)\)")
RESOLVER = re.compile(r'open(at)?\(.*"/etc/resolv\.conf"')


@pytest.fixture(scope="module")
def strace() -> list[str]:
    """strace -f, with seccomp-bpf where it works (only the traced calls stop: no slowdown)."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (apt-get install strace)")
    probe = None
    for extra in (["--seccomp-bpf"], []):
        command = ["strace", "-f", *extra, "-e", TRACED, "-o", os.devnull, "true"]
        probe = subprocess.run(command, capture_output=True, text=True)
        if probe.returncode == 0:
            return ["strace", "-f", *extra, "-e", TRACED]
    pytest.skip(f"strace cannot trace here (ptrace not permitted?): {probe.stderr.strip()}")


def tiny_onnx_package(folder: Path) -> ModelPackage:
    """A package whose backbone.onnx is a one-convolution stand-in: the engines load and run
    it like an exported backbone, in milliseconds."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    package = write_package(
        folder, image_size=56, layers=[1, 2], token_dim=8, embedding_dim=8,
        weights_source="random-init",
    )  # fmt: skip
    weights = np.random.default_rng(0).standard_normal((8, 3, 14, 14)).astype(np.float32)
    constants = [
        numpy_helper.from_array(weights, "weights"),
        numpy_helper.from_array(np.array([0, 8, 16], dtype=np.int64), "shape"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
    ]
    nodes = [
        helper.make_node("Conv", ["images", "weights"], ["patches"], strides=[14, 14]),
        helper.make_node("Reshape", ["patches", "shape"], ["flat"]),
        helper.make_node("Transpose", ["flat"], ["tokens_1"], perm=[0, 2, 1]),
        helper.make_node("Tanh", ["tokens_1"], ["tokens_2"]),
        helper.make_node("ReduceMean", ["tokens_2", "axes"], ["embedding"], keepdims=0),
    ]
    shapes = package.tensor_shapes()

    def value(name: str):
        dims = ["batch" if size == -1 else size for size in shapes[name]]
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)

    graph = helper.make_graph(
        nodes, "tiny", [value("images")], [value(name) for name in package.output_names],
        constants,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9  # what ONNX Runtime and OpenVINO read, whatever onnx writes
    onnx.checker.check_model(model)
    onnx.save(model, str(package.path(ONNX_FILE)))
    package.record_artifact(ONNX_FILE)
    package.write()
    return package


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> ModelPackage:
    return tiny_onnx_package(tmp_path_factory.mktemp("tiny") / "pkg")


def offline_env(home: Path) -> dict[str, str]:
    home.mkdir()
    return {**{k: v for k, v in os.environ.items() if k not in HIDING}, "HOME": str(home)}


def phoned(trace: Path) -> list[str]:
    """The traced calls that reach off the machine or look a name up."""
    found = []
    for line in trace.read_text().splitlines():
        if RESOLVER.search(line):
            found.append(line)
        elif SENDS.match(line) and "sa_family=AF_INET" in line:
            address = ADDRESS.search(line)
            port = PORT.search(line)
            ip = ipaddress.ip_address(next(filter(None, address.groups()))) if address else None
            mapped = getattr(ip, "ipv4_mapped", None)
            local = ip is not None and (ip.is_loopback or (mapped and mapped.is_loopback))
            if not local or (port and port.group(1) == "53"):
                found.append(line)
    return found


def created(home: Path) -> list[str]:
    return sorted(str(path.relative_to(home)) for path in home.rglob("*"))


def assert_offline(trace: Path, home: Path) -> None:
    calls, files = phoned(trace), created(home)
    assert not calls and not files, "\n".join([*calls, f"written under HOME: {files}"])


@pytest.mark.parametrize("engine", ENGINES)
def test_the_line_phones_nowhere_and_writes_nothing_in_home(
    engine: str, package: ModelPackage, bottle_dir: Path, tmp_path: Path, strace: list[str]
) -> None:
    if importlib.util.find_spec(engine) is None:  # not importorskip: it would phone home
        pytest.skip(f"{engine} is not installed")
    camera, out, trace = tmp_path / "camera", tmp_path / "out", tmp_path / "trace.txt"
    camera.mkdir()
    for path in sorted((bottle_dir / "train" / "good").glob("*.png"))[:4]:
        shutil.copy(path, camera)
    line = [
        *CLI, "run", "--once", "--camera-dir", str(camera), "--model", str(package.folder),
        "--out", str(out), "--settle", "0", "--engine", engine,
    ]  # fmt: skip
    result = subprocess.run(
        [*strace, "-o", str(trace), *line],
        env=offline_env(tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"engine {engine}" in result.stdout, result.stdout
    records = [json.loads(text) for text in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["score"] is not None for r in records), records
    assert_offline(trace, tmp_path / "home")


def test_the_runners_alone_phone_nowhere_either(
    package: ModelPackage, tmp_path: Path, strace: list[str]
) -> None:
    """Without the CLI (the runners from Python, as tests and scripts use them)."""
    engines = [name for name in ENGINES if importlib.util.find_spec(name) is not None]
    if not engines:
        pytest.skip("neither openvino nor onnxruntime is installed")
    script = (
        "import sys, numpy as np\n"
        "from musc_edge.package import load_package\n"
        "from musc_edge.runtime.runners import open_runner\n"
        "package = load_package(sys.argv[1])\n"
        "batch = np.zeros((2, 3, 56, 56), np.float32)\n"
        "for engine in sys.argv[2:]:\n"
        "    assert open_runner(package, engine)(batch)[1].shape == (2, 8)\n"
    )
    trace = tmp_path / "trace.txt"
    result = subprocess.run(
        [*strace, "-o", str(trace), sys.executable, "-c", script, str(package.folder), *engines],
        env=offline_env(tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert_offline(trace, tmp_path / "home")
