"""The model package: a folder whose `musc.json` says everything a runtime needs.

Written by `musc-edge export` on a workstation, completed by `musc-edge engine build` on the
device, read by the runtime. Reading checks every listed artifact's sha256, so a damaged or
mismatched package is refused with one line saying what is wrong instead of producing wrong
scores. `parity.json` beside it reports how closely each engine reproduces the torch model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
from pydantic import TypeAdapter, ValidationError

from musc_edge.errors import MuscEdgeError
from musc_edge.files import file_sha256, write_json_atomic
from musc_edge.images import Preprocess
from musc_edge.size import ImageSize

MANIFEST = "musc.json"
FORMAT = "musc-edge-package"
FORMAT_VERSION = 1
ONNX_FILE = "backbone.onnx"
ENGINE_FILE = "backbone.engine"
PARITY_FILE = "parity.json"
# One preprocessed image and the torch model's outputs for it: lets the device check an
# engine it builds against the workstation's torch model without having that model.
PARITY_REFERENCE_FILE = "parity_reference.npz"
INPUT_NAME = "images"
EMBEDDING_NAME = "embedding"


class PackageError(MuscEdgeError, ValueError):
    """A model package that cannot be used as it is; the message says what to do."""


def tensor_names(layers: list[int]) -> list[str]:
    """Graph output names of the block tokens, one per 1-based block index."""
    return [f"tokens_{layer}" for layer in layers]


@dataclass
class ModelPackage:
    """The parsed `musc.json` of one package folder.

    `precision` and `max_batch` are what the TensorRT engine is (or is to be) built with;
    `engine` is None until one is built, then names the GPU, compute capability and TensorRT
    version it runs on (an engine is not portable).
    """

    backbone: str
    weights_source: str
    weights_sha256: str | None
    image_size: int | list[int]  # one number: square; else [height, width] (ImageSize)
    patch_size: int
    layers: list[int]
    token_dim: int
    embedding_dim: int
    preprocess: dict
    precision: str
    max_batch: int
    musc: dict  # default MuSc settings: r_list, frac, k_list, precision (of the similarity)
    versions: dict[str, str | None]
    artifacts: dict[str, dict] = field(default_factory=dict)  # file -> {sha256, bytes}
    engine: dict | None = None
    onnx_opset: int | None = None
    created: str | None = None  # ISO 8601, UTC
    folder: Path | None = None

    @property
    def size(self) -> ImageSize:
        return ImageSize.parse(self.image_size)

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of the patch grid."""
        return self.size.grid(self.patch_size)

    @property
    def token_outputs(self) -> list[str]:
        return tensor_names(self.layers)

    @property
    def output_names(self) -> list[str]:
        """Every graph output, in graph order: the block tokens, then the embedding."""
        return [*self.token_outputs, EMBEDDING_NAME]

    def tensor_shapes(self) -> dict[str, list[int]]:
        """Shape of the input and of each output, -1 for the (dynamic) batch."""
        rows, columns = self.grid
        tokens = [-1, rows * columns, self.token_dim]
        return {
            INPUT_NAME: [-1, 3, *self.size.hw],
            **{name: tokens for name in self.token_outputs},
            EMBEDDING_NAME: [-1, self.embedding_dim],
        }

    def binding(self) -> dict:
        """What decides the scores: the exported backbone, its input and MuSc's settings
        (what a calibration must match; an engine built from the same ONNX does)."""
        model = self.artifacts.get("backbone.onnx", {}).get("sha256")
        binding = scoring_binding(self.backbone, self.size, self.layers, self.preprocess, self.musc)
        return {"backbone_sha256": model or self.weights_sha256, **binding}

    @property
    def sha256(self) -> str:
        """One hash of `binding()`: which model scored a record (every record carries it)."""
        text = json.dumps(self.binding(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def preprocessing(self) -> Preprocess:
        return Preprocess.from_dict(self.preprocess)

    def path(self, name: str) -> Path:
        if self.folder is None:
            raise PackageError("package has no folder; load it with load_package")
        return self.folder / name

    def to_dict(self) -> dict:
        """The manifest, with the derived grid and tensor shapes spelled out for readers."""
        data = asdict(self)
        data.pop("folder")
        derived = {"grid": list(self.grid), "tensors": {"dtype": "float32", **self.tensor_shapes()}}
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **derived, **data}

    @classmethod
    def from_dict(cls, data: dict, folder: Path | None = None) -> ModelPackage:
        if data.get("format") != FORMAT:
            raise PackageError(f"{folder}: {MANIFEST} is not a musc-edge package manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise PackageError(
                f"{folder}: package format {data.get('format_version')} is not supported by "
                f"this musc-edge (format {FORMAT_VERSION}); export the package again"
            )
        stored = [f for f in fields(cls) if f.name != "folder"]
        required = {f.name for f in stored if f.default is MISSING and f.default_factory is MISSING}
        missing = required - set(data)
        if missing:
            raise PackageError(f"{folder}: {MANIFEST} lacks {sorted(missing)}; export again")
        known = {f.name for f in stored}
        values = {k: v for k, v in data.items() if k in known}
        try:
            return _SCHEMA.validate_python({**values, "folder": folder})
        except ValidationError as error:
            problem = error.errors()[0]
            where = problem["loc"][0]  # the field; not the union member pydantic tried last
            raise PackageError(
                f"{folder}: {MANIFEST} field {where} = {problem['input']!r}: {problem['msg']}; "
                "export the package again"
            ) from None

    def record_artifact(self, name: str) -> None:
        """Hash a file of the package folder into the manifest."""
        path = self.path(name)
        self.artifacts[name] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}

    def write(self) -> None:
        """Write musc.json atomically into the package folder."""
        write_json_atomic(self.path(MANIFEST), self.to_dict())


def scoring_binding(
    backbone: str, image_size: ImageSize, layers: Sequence[int], preprocess: dict, musc: Mapping
) -> dict:
    """The settings a calibration is bound to, as stored (tuples become lists): one layout
    for a package's binding and for eval's, which runs the torch model and has no sha256."""
    binding = {
        "backbone": backbone,
        "image_size": image_size.to_json(),
        "layers": list(layers),
        "preprocess": preprocess,
        "musc": {key: musc[key] for key in ("r_list", "frac", "k_list")},
    }
    return json.loads(json.dumps(binding))


# the manifest is validated against ModelPackage's own field types (one definition of both)
_SCHEMA = TypeAdapter(ModelPackage)


def load_package(
    folder: Path, image_size: ImageSize | int | None = None, *, skip: Collection[str] = ()
) -> ModelPackage:
    """Read and verify a package: manifest present and current, every artifact intact.

    `image_size`, when given, must match the package's: an engine has one fixed resolution.
    `skip` names artifacts not to verify, such as an engine that is about to be rebuilt.
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
        if name in skip:
            continue
        path = folder / name
        if not path.is_file():
            raise PackageError(f"{folder}: {name} is missing; export or build it again")
        if file_sha256(path) != info["sha256"]:
            raise PackageError(
                f"{folder}: {name} does not match its sha256 in {MANIFEST} (damaged or "
                "replaced); export or build it again"
            )
    if image_size is not None and ImageSize.parse(image_size) != package.size:
        raise PackageError(
            f"{folder} was exported for {package.size}px images, not {image_size}px; "
            "export a package at that size"
        )
    return package


def compare_outputs(
    reference: Mapping[str, np.ndarray],
    outputs: Mapping[str, np.ndarray],
    tolerance: float,
    **details: object,
) -> dict:
    """One runner's parity.json entry: per output max_abs = max |out - ref| and
    max_rel = max_abs / max |ref|, the worst max_rel, and whether it is within `tolerance`.

    Relative to the output's largest magnitude rather than element by element, so that
    values near zero do not turn rounding noise into huge ratios. NaN or inf count as inf.
    """
    errors = {}
    for name, ref in reference.items():
        ref64 = np.asarray(ref, np.float64)
        diff = np.abs(np.asarray(outputs[name], np.float64) - ref64)
        max_abs = float(diff.max()) if np.isfinite(diff).all() else float("inf")
        errors[name] = {
            "max_abs": max_abs,
            "max_rel": max_abs / (float(np.abs(ref64).max()) or 1.0),
        }
    worst = max(error["max_rel"] for error in errors.values())
    return {
        **details,
        "tolerance": tolerance,
        "max_rel": worst,
        "passed": worst <= tolerance,
        "outputs": errors,
    }


def record_parity(folder: Path, runner: str, entry: dict) -> None:
    """Set one runner's entry in the folder's parity.json, keeping the others."""
    path = Path(folder) / PARITY_FILE
    report = json.loads(path.read_text()) if path.is_file() else {}
    report[runner] = entry
    write_json_atomic(path, report)
