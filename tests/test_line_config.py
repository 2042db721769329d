"""`musc-edge run --config`: the file holds run's own options and the sinks; flags win."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from musc_edge.cli import app, run_cmd
from musc_edge.cli.run_cmd import line_settings
from musc_edge.errors import UsageError
from musc_edge.runtime.journal import RESULTS_FILE
from musc_edge.runtime.settings import LineSettings, Mode, RunSettings
from tests.helpers import run_context, torch_run_config

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "line" / "example-line.yaml"


def test_the_example_config_is_valid_and_fills_every_key(tmp_path: Path) -> None:
    settings = line_settings(run_context([]), EXAMPLE)
    assert settings.mode == "rolling" and settings.batch_size == 32
    assert settings.camera_dir == Path("/data/line1/cam1")
    assert settings.out_dir == Path("/data/line1/cam1-results")
    assert settings.refresh_references == 20 and settings.serve == "127.0.0.1:8765"
    assert set(settings.sinks) == {"mqtt", "webhook", "opcua"}
    assert settings.sinks["webhook"]["token_env"] == "MES_TOKEN"


def test_relative_paths_in_the_file_are_relative_to_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "line.yaml").write_text("camera_dir: cam1\nmodel: /opt/pkg\n")
    settings = line_settings(run_context([]), folder / "line.yaml")
    assert settings.camera_dir == folder / "cam1" and settings.model == Path("/opt/pkg")


def test_a_flag_wins_over_the_file(tmp_path: Path) -> None:
    settings = line_settings(run_context(["--batch-size", "8", "--mode", "batch"]), EXAMPLE)
    assert settings.batch_size == 8 and settings.mode == "batch"


def test_flags_file_and_python_validate_into_one_model(tmp_path: Path) -> None:
    """One source of defaults and ranges: a flag, a file key and Python are checked alike."""
    given = ["--camera-dir", str(tmp_path / "cam"), "--model", "pkg", "--batch-size", "0"]
    with pytest.raises(UsageError, match=r"^--batch-size: Input should be greater than or equal"):
        line_settings(run_context(list(given)), None)
    settings = line_settings(run_context(given[:4]), None)
    assert settings == RunSettings(tmp_path / "cam", model=Path("pkg"))
    assert settings.batch_size == 32 and settings.mode is Mode.batch
    assert settings.out_dir == tmp_path / "cam-musc-results"  # beside the camera folder
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        LineSettings(tmp_path / "cam", batch_size=0)
    with pytest.raises(ValueError, match="is the camera folder"):
        LineSettings(tmp_path / "cam", tmp_path / "cam")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("batchsize: 8", r"batchsize: unknown key \(did you mean batch_size\?\); the keys are"),
        ("max-wiat: 8", r"max_wiat: unknown key \(did you mean max_wait\?\)"),
        ("batch_size: zero", r"line.yaml: batch_size: .*integer"),
        ("batch_size: 0", r"line.yaml: batch_size: .*1"),
        ("mode: sometimes", r"line.yaml: mode: .*batch.*rolling"),
        ("sinks: [mqtt]", r"sinks must map a sink's name to its options"),
        ("- a list", r"must be a mapping of option: value"),
        ("mode: [unclosed", r"is not valid YAML at line 1"),
    ],
)
def test_bad_config_is_refused_on_one_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "line.yaml"
    path.write_text(content if content.startswith(("-", "mode: [")) else f"{BASE}{content}\n")
    with pytest.raises(UsageError, match=message):
        line_settings(run_context([]), path)


BASE = "camera_dir: /data/cam1\nmodel: /opt/pkg\n"  # what every valid file needs


def test_run_with_a_config_file_and_a_sink_from_it(tmp_path: Path) -> None:
    """A real run of the torch engine on random weights, every option from the file."""
    webhook = {"url": "http://127.0.0.1:9/none", "flush_s": 0.1}
    config = torch_run_config(tmp_path, batch_size=3, sinks={"webhook": webhook})
    (tmp_path / "line.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["run", "--config", str(tmp_path / "line.yaml")])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "out" / RESULTS_FILE).open()]
    assert len(records) == 6 and {r["batch"] for r in records} == {1, 2}
    # the webhook receiver is down: its backlog waits on disk for the next start
    assert (tmp_path / "out" / "outbox" / "webhook").is_dir()


def test_camera_dir_is_required_somewhere(tmp_path: Path) -> None:
    (tmp_path / "line.yaml").write_text("batch_size: 4\n")
    result = CliRunner().invoke(app, ["run", "--config", str(tmp_path / "line.yaml")])
    assert result.exit_code == 2
    assert "--camera-dir is required (on the command line or in a --config file)" in " ".join(
        result.output.split()
    )


@pytest.mark.parametrize("text", ["127.0.0.1", "host:port", "[::1]:70000", ":8765"])
def test_serve_address_must_be_host_and_port(text: str) -> None:
    with pytest.raises(UsageError, match="--serve takes HOST:PORT"):
        run_cmd.parse_address(text)


def test_serve_address_accepts_ipv6_in_brackets() -> None:
    assert run_cmd.parse_address("[::1]:8765") == ("::1", 8765)
    assert run_cmd.parse_address("127.0.0.1:8765") == ("127.0.0.1", 8765)
