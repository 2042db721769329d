"""musc.json round trip, and every kind of damaged or mismatched package refused clearly."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from musc_edge.images import Preprocess
from musc_edge.package import (
    ENGINE_FILE,
    MANIFEST,
    ONNX_FILE,
    PARITY_FILE,
    PackageError,
    compare_outputs,
    load_package,
    record_parity,
)
from tests.helpers import make_package


def test_round_trip(tmp_path: Path) -> None:
    written = make_package(tmp_path / "pkg")
    loaded = load_package(tmp_path / "pkg", image_size=224)
    assert loaded.to_dict() == json.loads(json.dumps(written.to_dict()))
    assert loaded.folder == tmp_path / "pkg"
    assert loaded.grid == (16, 16)
    assert loaded.output_names == ["tokens_3", "tokens_6", "tokens_9", "tokens_12", "embedding"]
    assert loaded.preprocessing() == Preprocess(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert not list((tmp_path / "pkg").glob(".*partial")), "atomic write left its temporary file"


def test_manifest_spells_out_what_the_runtime_must_not_guess(tmp_path: Path) -> None:
    make_package(tmp_path / "pkg")
    data = json.loads((tmp_path / "pkg" / MANIFEST).read_text())
    assert data["grid"] == [16, 16]
    assert data["tensors"]["images"] == [-1, 3, 224, 224]
    assert data["tensors"]["tokens_12"] == [-1, 256, 384]
    assert data["tensors"]["embedding"] == [-1, 384]
    assert data["preprocess"]["colour_order"] == "RGB"
    assert set(data["artifacts"][ONNX_FILE]) == {"sha256", "bytes"}


def _remove_onnx(folder: Path) -> None:
    (folder / ONNX_FILE).unlink()


def _damage_onnx(folder: Path) -> None:
    (folder / ONNX_FILE).write_bytes(b"stand-in grapH")


def _edit_manifest(**changes: object):
    def edit(folder: Path) -> None:
        data = json.loads((folder / MANIFEST).read_text())
        data.update(changes)
        for key in [k for k, v in changes.items() if v is None]:
            del data[key]
        (folder / MANIFEST).write_text(json.dumps(data))

    return edit


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_remove_onnx, "backbone.onnx is missing"),
        (_damage_onnx, "does not match its sha256"),
        (lambda folder: (folder / MANIFEST).unlink(), "has no musc.json"),
        (lambda folder: (folder / MANIFEST).write_text("{"), "not valid JSON"),
        (_edit_manifest(format="something-else"), "not a musc-edge package manifest"),
        (_edit_manifest(format_version=99), "package format 99 is not supported"),
        (_edit_manifest(token_dim=None), "lacks ['token_dim']"),
        (shutil.rmtree, "not found; run `musc-edge export` first"),
    ],
    ids=[
        "missing-file",
        "wrong-sha256",
        "no-manifest",
        "bad-json",
        "format",
        "version",
        "key",
        "gone",
    ],
)
def test_damaged_package_is_refused(tmp_path: Path, damage, message: str) -> None:
    make_package(tmp_path / "pkg")
    damage(tmp_path / "pkg")
    with pytest.raises(PackageError, match=re.escape(message)):
        load_package(tmp_path / "pkg")


def test_package_for_another_image_size_is_refused(tmp_path: Path) -> None:
    make_package(tmp_path / "pkg")
    with pytest.raises(PackageError, match="exported for 224px images, not 518px"):
        load_package(tmp_path / "pkg", image_size=518)


def test_skip_leaves_an_artifact_about_to_be_rebuilt_unchecked(tmp_path: Path) -> None:
    package = make_package(tmp_path / "pkg")
    (tmp_path / "pkg" / ENGINE_FILE).write_bytes(b"engine")
    package.record_artifact(ENGINE_FILE)
    package.write()
    (tmp_path / "pkg" / ENGINE_FILE).write_bytes(b"damaged")
    with pytest.raises(PackageError, match=r"backbone\.engine does not match"):
        load_package(tmp_path / "pkg")
    assert load_package(tmp_path / "pkg", skip={ENGINE_FILE}).artifacts[ENGINE_FILE]


def test_compare_outputs_is_relative_to_each_outputs_scale() -> None:
    reference = {"tokens_3": np.array([[10.0, -20.0]]), "embedding": np.array([[0.6, 0.8]])}
    outputs = {"tokens_3": np.array([[10.0, -20.002]]), "embedding": np.array([[0.6, 0.8]])}
    entry = compare_outputs(reference, outputs, 1e-4, runner_detail="x")
    assert entry["outputs"]["tokens_3"]["max_abs"] == pytest.approx(0.002)
    assert entry["outputs"]["tokens_3"]["max_rel"] == pytest.approx(1e-4)
    assert entry["outputs"]["embedding"] == {"max_abs": 0.0, "max_rel": 0.0}
    assert entry["passed"] and entry["runner_detail"] == "x"
    outputs["embedding"] = np.array([[np.nan, 0.8]])
    broken = compare_outputs(reference, outputs, 1e-4)
    assert broken["max_rel"] == float("inf") and not broken["passed"]


def test_record_parity_keeps_the_other_runners(tmp_path: Path) -> None:
    record_parity(tmp_path, "onnxruntime", {"passed": True})
    record_parity(tmp_path, "tensorrt", {"skipped": "no GPU"})
    record_parity(tmp_path, "tensorrt", {"passed": False})
    assert json.loads((tmp_path / PARITY_FILE).read_text()) == {
        "onnxruntime": {"passed": True},
        "tensorrt": {"passed": False},
    }
