"""`musc-edge demo`, the README's main job, end to end on a fresh folder: weights, export,
generated parts, the line, the summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from musc_edge.cli import app


@pytest.mark.slow
def test_demo_runs_the_whole_chain_and_finds_the_drawn_defects(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "image AUROC 100.0 on the drawn defects" in said
    records = [json.loads(line) for line in (tmp_path / "demo/results/results.jsonl").open()]
    assert len(records) == 24 and not any(record["error"] for record in records)
    again = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert again.exit_code == 0 and "is intact; reusing it" in " ".join(again.output.split())
