"""The model package: a folder whose `musc.json` says everything a runtime needs.

Written by `musc-edge export` on a workstation, read by the runtime on the device. Reading
checks every listed artifact's sha256, so a damaged or mismatched package is refused with one
line saying what is wrong instead of producing wrong scores.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from musc_edge.images import Preprocess

MANIFEST = "musc.json"
FORMAT = "musc-edge-package"
FORMAT_VERSION = 1
ONNX_FILE = "backbone.onnx"
ENGINE_FILE = "backbone.engine"
PARITY_FILE = "parity.json"


class PackageError(ValueError):
    """A model package that cannot be used as it is; the message says what to do."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensor_names(layers: list[int]) -> list[str]:
    """Graph output names of the block tokens, one per 1-based block index."""
    return [f"tokens_{layer}" for layer in layers]


@dataclass
class ModelPackage:
    """The parsed `musc.json` of one package folder."""

    backbone: str
    weights_source: str
    weights_sha256: str | None
    image_size: int
    patch_size: int
    layers: list[int]
    token_dim: int
    embedding_dim: int
    preprocess: dict
    precision: str
    max_batch: int
    musc: dict  # default MuSc settings: r_list, frac, k_list
    versions: dict[str, str | None]
    artifacts: dict[str, dict] = field(default_factory=dict)  # file -> {sha256, bytes}
    engine: dict | None = None  # GPU name, compute capability, TensorRT version
    folder: Path | None = None

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def token_outputs(self) -> list[str]:
        return tensor_names(self.layers)

    def preprocessing(self) -> Preprocess:
        return Preprocess.from_dict(self.preprocess)

    def path(self, name: str) -> Path:
        if self.folder is None:
            raise PackageError("package has no folder; load it with load_package")
        return self.folder / name

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("folder")
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "grid": self.grid, **data}

    @classmethod
    def from_dict(cls, data: dict, folder: Path | None = None) -> ModelPackage:
        if data.get("format") != FORMAT:
            raise PackageError(f"{folder}: {MANIFEST} is not a musc-edge package manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise PackageError(
                f"{folder}: package format {data.get('format_version')} is not supported by "
                f"this musc-edge (format {FORMAT_VERSION}); export the package again"
            )
        known = {name for name in cls.__dataclass_fields__ if name != "folder"}
        missing = known - set(data) - {"artifacts", "engine"}
        if missing:
            raise PackageError(f"{folder}: {MANIFEST} lacks {sorted(missing)}; export again")
        return cls(**{k: v for k, v in data.items() if k in known}, folder=folder)

    def record_artifact(self, name: str) -> None:
        """Hash a file of the package folder into the manifest."""
        path = self.path(name)
        self.artifacts[name] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}

    def write(self) -> None:
        """Write musc.json atomically into the package folder."""
        target = self.path(MANIFEST)
        partial = target.with_name(f".{MANIFEST}.partial")
        partial.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(partial, target)


def load_package(folder: Path, image_size: int | None = None) -> ModelPackage:
    """Read and verify a package: manifest present and current, every artifact intact.

    `image_size`, when given, must match the package's: an engine has one fixed resolution.
    """
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not folder.is_dir():
        raise PackageError(f"model package {folder} not found; run `musc-edge export` first")
    if not manifest.is_file():
        raise PackageError(f"{folder} has no {MANIFEST}; it is not a model package")
    try:
        package = ModelPackage.from_dict(json.loads(manifest.read_text()), folder)
    except json.JSONDecodeError as error:
        raise PackageError(f"{manifest} is not valid JSON ({error}); export again") from None
    for name, info in package.artifacts.items():
        path = folder / name
        if not path.is_file():
            raise PackageError(f"{folder}: {name} is missing; export or build it again")
        if file_sha256(path) != info["sha256"]:
            raise PackageError(
                f"{folder}: {name} does not match its sha256 in {MANIFEST} (damaged or "
                "replaced); export or build it again"
            )
    if image_size is not None and image_size != package.image_size:
        raise PackageError(
            f"{folder} was exported for {package.image_size}px images, not {image_size}px; "
            "export a package at that size"
        )
    return package
