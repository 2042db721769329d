"""A plant's lines as one scoring service holds them, Ray aside (`serve.py` deploys this).

`PlantSettings` is `plant.yaml`: the lines by name, each a model package and (recommended) a
calibration, both pinned by sha256 when the file gives one, and how the service runs. A
replica builds `PlantLines` from it: each package once (lines sharing a package share its
runner), each calibration's known-good parts, and each line's `LineSpec` for its stations.
`PlantLines.score` takes line batches from any number of lines, runs the backbone over all
their images together (what `@serve.batch` gathers across lines), and scores each batch with
its own line's MuSc and known-good parts, as `run` would on the station.

The replica keeps no state between requests: what a line has learnt (its threshold history)
is in its station's journal, and a batch too small to judge alone brings its references
along, so a replica that dies and starts again, here or on another node, answers the same.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass as settings_dataclass

from musc_edge.errors import UsageError
from musc_edge.files import file_sha256
from musc_edge.musc import MuSc
from musc_edge.package import ModelPackage
from musc_edge.parallel import scoring_device
from musc_edge.runtime.camera import Arrival
from musc_edge.runtime.known_good import KnownGood
from musc_edge.runtime.runners import Runner
from musc_edge.runtime.scoring import Answer, Item, score_after
from musc_edge.runtime.settings import (
    ITEM_NAME,
    Engine,
    beside,
    read_yaml_mapping,
    refuse_unknown,
    settings_problem,
)
from musc_edge.runtime.verdicts import CalibratedJudge
from musc_edge.runtime.wire import LineSpec

CONFIG = ConfigDict(extra="forbid")


@settings_dataclass(config=CONFIG)
class PlantLine:
    """One served line: its package and calibration, refused at start when a pinned sha256
    differs (the file names what was validated; a copy that changed is not that)."""

    model: Path
    calibration: Path | None = None
    model_sha256: str | None = None  # the package's musc.json sha256 (`run` records it)
    calibration_sha256: str | None = None  # the calibration file's sha256


@settings_dataclass(config=CONFIG)
class PlantSettings:
    """plant.yaml: the lines, and how the service runs (docs/deployment.md, "A plant")."""

    lines: dict[str, PlantLine] = Field(min_length=1)
    host: str = "127.0.0.1"  # where the stations reach the service (0.0.0.0: every interface)
    port: int = Field(8000, ge=1, le=65535)
    replicas: int = Field(1, ge=1)
    cpus_per_replica: float = Field(1, gt=0)
    gpus_per_replica: float | None = Field(None, ge=0)  # None: 1 where the cluster has GPUs
    max_replicas_per_node: int | None = Field(None, ge=1)  # 1: spread replicas over nodes
    engine: Engine = Engine.auto  # type: ignore[attr-defined]
    max_batch_size: int = Field(4, ge=1)  # line batches gathered into one backbone run
    batch_wait_s: float = Field(0.01, ge=0)  # how long a request waits for others to join
    proxy: Literal["head", "every-node"] = "head"  # where Serve listens for HTTP

    def __post_init__(self) -> None:
        for name in self.lines:
            if not re.match(ITEM_NAME, name):
                raise ValueError(f"line name {name!r}: use letters, digits, '_', '.' and '-'")


def load_plant(path: Path, overrides: dict[str, Any] | None = None) -> PlantSettings:
    """plant.yaml (paths in it relative to the file), with `overrides` (the flags) over it."""
    values = read_yaml_mapping(path, "plant config")
    lines = values.get("lines")
    if isinstance(lines, dict):
        # absolute: a replica does not start in the folder the command was given in
        values["lines"] = {n: paths_beside(path.resolve(), line) for n, line in lines.items()}
    return plant_settings({**values, **(overrides or {})}, str(path))


def paths_beside(path: Path, line: object) -> object:
    """A line's model and calibration relative to plant.yaml's folder."""
    if not isinstance(line, dict):
        return line  # validation says what is wrong with it
    return {k: beside(path, v) if k in ("model", "calibration") else v for k, v in line.items()}


def plant_settings(values: dict[str, Any], source: str) -> PlantSettings:
    """Validate plant.yaml's mapping; any problem is one UsageError naming the key."""
    for key in values:
        refuse_unknown(key, PLANT_KEYS, f"{source}: {key}")
    lines = values.get("lines")
    for name, line in (lines or {}).items() if isinstance(lines, dict) else ():
        for key in line if isinstance(line, dict) else ():
            refuse_unknown(key, LINE_KEYS, f"{source}: lines.{name}.{key}")
    try:
        return PlantSettings(**values)
    except ValidationError as error:
        raise UsageError(settings_problem(error, lambda key: f"{source}: {key}")) from None


PLANT_KEYS = [field.name for field in fields(PlantSettings)]
LINE_KEYS = [field.name for field in fields(PlantLine)]


class UnknownLine(UsageError):
    """A request for a line plant.yaml does not list (the service answers 404)."""


@dataclass
class ServedLine:
    """A line as a replica holds it."""

    name: str
    package: ModelPackage
    runner: Runner
    musc: MuSc
    known_good: KnownGood | None
    spec: LineSpec


@dataclass
class LineBatch:
    """One station request: a line's batch of resized images and the batch before it."""

    line: str
    images: np.ndarray  # (N, H, W, 3) uint8 BGR at the package's size
    previous: np.ndarray  # (M, H, W, 3): references for a batch below 5 parts, else empty
    map_norm: str = "batch"
    window: int = 32  # the station's batch size: its window of previous parts


class PlantLines:
    """Every line of the plant, loaded and checked; see the module docstring."""

    def __init__(self, settings: PlantSettings) -> None:
        from musc_edge.package import load_package
        from musc_edge.runtime.runners import open_runner

        self.lines: dict[str, ServedLine] = {}
        opened: dict[str, tuple[ModelPackage, Runner, MuSc]] = {}  # by package sha256
        for name, line in settings.lines.items():
            package = load_package(line.model)
            pinned(f"line {name}: model {line.model}", package.sha256, line.model_sha256)
            if package.sha256 not in opened:
                runner = open_runner(package, Engine(settings.engine).value)
                opened[package.sha256] = (package, runner, MuSc.for_package(package))
            package, runner, musc = opened[package.sha256]
            self.lines[name] = served_line(name, line, package, runner, musc)

    def line(self, name: str) -> ServedLine:
        try:
            return self.lines[name]
        except KeyError:
            raise UnknownLine(
                f"no line {name!r} is served here; the lines are {', '.join(sorted(self.lines))}"
            ) from None

    def check(self, batch: LineBatch) -> None:
        """A request for a served line with images of its package's size (UsageError)."""
        size = tuple(self.line(batch.line).package.preprocessing().image_size.hw)
        for name, images in (("images", batch.images), ("previous", batch.previous)):
            if len(images) and tuple(images.shape[1:3]) != size:
                raise UsageError(
                    f"line {batch.line}: {name} are {images.shape[1]}x{images.shape[2]} "
                    f"pixels; this line's package takes {size[0]}x{size[1]}"
                )

    def score(self, batches: list[LineBatch]) -> list[list[Answer]]:
        """Each batch's answers; the backbone runs once per package over all the images."""
        for batch in batches:
            self.check(batch)
        items = {id(b): (request_items(b.images), request_items(b.previous)) for b in batches}
        by_package: dict[str, list[LineBatch]] = {}
        for batch in batches:
            by_package.setdefault(self.line(batch.line).package.sha256, []).append(batch)
        device = scoring_device()
        for chosen in by_package.values():
            line = self.line(chosen[0].line)  # every line of the group has this package
            every = [item for batch in chosen for group in items[id(batch)] for item in group]
            normalise = line.package.preprocessing().normalise
            tokens, embeddings = line.runner.in_chunks(
                np.stack([normalise(i.pixels) for i in every])
            )
            tokens = [layer.to(device) for layer in tokens]
            embeddings = embeddings.to(device)
            for index, item in enumerate(every):
                item.tokens = [layer[index] for layer in tokens]
                item.embedding = embeddings[index]
        return [
            score_after(
                *items[id(batch)],
                self.line(batch.line).musc,
                batch.map_norm,
                self.line(batch.line).known_good,
                batch.window,
            )
            for batch in batches
        ]


def request_items(images: np.ndarray) -> list[Item]:
    """A request's images as items (no file behind them: the station keeps the records)."""
    return [
        Item(
            Arrival(Path(str(index)), (str(index), 0, 0, 0), 0.0),
            None,
            None,
            np.zeros((1, 1, 3), np.uint8),  # the station draws the overlays
            image.shape[:2],
            0.0,
            pixels=image,
        )
        for index, image in enumerate(images)
    ]


def served_line(
    name: str, line: PlantLine, package: ModelPackage, runner: Runner, musc: MuSc
) -> ServedLine:
    """A line's calibration loaded and checked, and the description its stations get."""
    from musc_edge.calibration import load_calibration

    known_good, judge, region, calibration_sha256 = None, None, None, None
    if line.calibration is not None:
        calibration_sha256 = file_sha256(line.calibration)
        where = f"line {name}: calibration {line.calibration}"
        pinned(where, calibration_sha256, line.calibration_sha256)
        calibration = load_calibration(line.calibration, package)
        region = calibration.info.get("region")  # the station cuts the calibration's box
        known_good = KnownGood(calibration, 0, musc.precision.dtype)
        judge = CalibratedJudge.of(calibration).to_json()
    spec = LineSpec(
        name,
        package.sha256,
        package.backbone,
        package.preprocessing().to_dict(),
        region,
        calibration_sha256,
        judge,
    )
    return ServedLine(name, package, runner, musc, known_good, spec)


def pinned(what: str, actual: str, expected: str | None) -> None:
    """Refuse a file whose sha256 is not the one plant.yaml pins."""
    if expected is not None and actual != expected.lower():
        raise UsageError(
            f"{what} has sha256 {actual[:16]}..., plant.yaml pins {expected[:16]}...; "
            "deploy the validated file or update the pin"
        )
