"""The service unit and the container files: what can be checked without systemd running
the unit or a container registry (neither exists on CI's machine)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import typer

from musc_edge.cli import app

DEPLOY = Path(__file__).resolve().parents[1] / "configs" / "deploy"
UNIT = DEPLOY / "musc-edge@.service"


def run_arguments(argv: list[str]) -> None:
    """Parse `musc-edge ARGS` with the real command tree (groups included), without running."""
    command = typer.main.get_command(app)
    while hasattr(command, "commands"):
        name, *argv = argv
        command = command.commands[name]
    command.make_context(name, argv)


def commented_commands(text: str, image: str) -> list[list[str]]:
    """The `musc-edge:TAG ARGS` invocations shown in a file's comments, continuations joined."""
    comments = " ".join(
        line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")
    ).replace("\\ ", "")
    return [shlex.split(args) for args in re.findall(rf"{image} ([a-z].+?)(?= [A-Z]|$)", comments)]


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here")
    instance = tmp_path / "musc-edge@line1.service"
    instance.write_text(UNIT.read_text())
    result = subprocess.run(
        ["systemd-analyze", "verify", str(instance)], capture_output=True, text=True
    )
    complaints = [
        line
        for line in result.stderr.splitlines()
        if line.strip() and "is not executable" not in line  # no install on this machine
    ]
    assert complaints == []


def test_unit_runs_the_line_config_and_does_not_restart_on_user_errors() -> None:
    text = UNIT.read_text()
    exec_start = re.search(r"^ExecStart=(.+)$", text, re.M).group(1)
    program, *arguments = shlex.split(exec_start.replace("%i", "line1"))
    assert program.endswith("/musc-edge")
    run_arguments(arguments)  # `run --config /etc/musc-edge/line1.yaml` parses
    assert "Restart=on-failure" in text and "KillSignal=SIGTERM" in text
    assert "RestartPreventExitStatus=2" in text  # exit 2 = a person must fix something


@pytest.mark.parametrize("dockerfile", sorted(DEPLOY.glob("Dockerfile.*")), ids=lambda p: p.name)
def test_dockerfiles_copy_what_exists_and_run_real_commands(dockerfile: Path) -> None:
    root = DEPLOY.parents[1]
    text = dockerfile.read_text()
    for source in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for path in source.split():
            assert (root / path).exists(), f"{dockerfile.name} copies {path}, which is missing"
    extras = re.search(r'"\.\[([a-z,]+)\]"', text).group(1).split(",")
    declared = (root / "pyproject.toml").read_text()
    for extra in extras:
        assert re.search(rf"^{extra} = ", declared, re.M), f"no extra {extra!r} in pyproject"
    image = re.search(r"-t (musc-edge:\S+)", text).group(1)
    shown = commented_commands(text, image)
    assert shown, f"{dockerfile.name} shows no musc-edge command"
    for arguments in shown:
        run_arguments(arguments)


def test_the_example_plant_config_is_valid_and_names_paths_beside_it() -> None:
    from musc_edge.runtime.plant import load_plant

    plant = load_plant(DEPLOY / "plant.yaml")
    assert sorted(plant.lines) == ["line1", "line2"]
    line1 = plant.lines["line1"]
    assert line1.model.is_absolute()
    assert line1.model.resolve() == (DEPLOY / "../../packages/dinov2-vits14-224").resolve()
    assert line1.calibration.is_absolute() and plant.lines["line2"].calibration is None
    commands = re.findall(r"`(musc-edge [^`]+)`", (DEPLOY / "plant.yaml").read_text())
    for command in commands:  # the commands its comments show parse as the CLI has them
        run_arguments(command.split()[1:])
