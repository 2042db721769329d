"""How a line runs: one settings model that the flags, the line config and Python all use.

`LineSettings` is what the line loop needs, `RunSettings` adds what `musc-edge run` needs to
build it (the package, the engine, the live view). Each is the one source of its defaults,
ranges and choices: `run`'s typer options take their defaults from here, a line config (YAML)
is validated here, and Python code builds them directly. Unknown keys are refused with the
closest known one suggested, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import AliasChoices, ConfigDict, Field, ValidationError, field_validator
from pydantic.dataclasses import dataclass

from musc_edge.errors import UsageError
from musc_edge.images import DEFAULT_MAX_PIXELS
from musc_edge.precision import Precision
from musc_edge.region import Region
from musc_edge.runtime.runners import ENGINES


class Mode(str, enum.Enum):
    """batch: score full batches together; rolling: each image on arrival (schedulers.py)."""

    batch = "batch"
    rolling = "rolling"


class MapNorm(str, enum.Enum):
    """Heatmaps scaled over the batch or per image."""

    batch = "batch"
    image = "image"


# The engine names come from the runner registry, the one list of them.
Engine = enum.Enum("Engine", {name: name for name in ("auto", *ENGINES)}, type=str)


def default_out(camera_dir: Path) -> Path:
    """CAMERA_DIR-musc-results beside the camera folder: outside it, so never watched."""
    camera_dir = Path(camera_dir).resolve()
    return camera_dir.parent / f"{camera_dir.name}-musc-results"


CONFIG = ConfigDict(extra="forbid", populate_by_name=True)
ITEM_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # an item's name: a record field and a topic part


def parse_region(value: object) -> object:
    """A region from "x,y,width,height" or a list, stored as a tuple; None stays None."""
    return None if value is None else tuple(Region.parse(value).to_json())


@dataclass(config=CONFIG)
class ItemSettings:
    """One inspection item of the camera image: its box, and the known-good parts of that box
    (`musc-edge calibrate --region` with the same box) or a fixed threshold."""

    region: tuple[int, int, int, int]  # x, y, width, height in the image's pixels
    calibration: Path | None = None
    threshold: float | None = None  # None: the calibration's, else the item's own history

    _region = field_validator("region", mode="before")(parse_region)


@dataclass(config=CONFIG)
class LineSettings:
    """How the line runs; every field is a `musc-edge run` option of the same name."""

    camera_dir: Path
    # default: CAMERA_DIR-musc-results beside the camera folder (`out` in a line config)
    out_dir: Path | None = Field(None, validation_alias=AliasChoices("out_dir", "out"))
    batch_size: int = Field(32, ge=1)
    mode: Mode = Mode.batch
    watch: bool = True
    threshold: float | None = None  # None ("auto"): the calibration's, else the line's history
    calibration: Path | None = None  # known-good parts from `musc-edge calibrate`
    refresh_references: int = Field(0, ge=0)  # calibrated: recent clearly-normal parts join
    # calibrated: also score parts mutually (MuSc's MSM and RsCIN over the batch or window);
    # off, each part is judged by its known-good parts alone, on arrival (docs/verdicts.md)
    mutual: bool = False
    map_norm: MapNorm = MapNorm.batch
    poll: float = Field(0.5, ge=0.01)
    settle: float = Field(1.0, ge=0)
    decode_timeout: float = Field(10.0, ge=0)
    max_wait: float | None = Field(60.0, ge=0)  # watch: answer a part this old; 0 or None: never
    sinks: dict[str, dict[str, Any]] = Field(default_factory=dict)  # extra sinks, in order
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)  # images declaring more are refused
    overlap: bool | None = None  # batch mode: extract the next images while one is scored
    ignore: tuple[str, ...] = ()  # glob patterns of camera paths never looked at (an archive)
    region: tuple[int, int, int, int] | None = None  # x, y, width, height: the part's box
    # several inspection items per image, by name: each its own box, calibration and verdict;
    # the image's verdict is the worst of them (docs/runtime.md, "Inspection items")
    items: dict[str, ItemSettings] = Field(default_factory=dict)

    _region = field_validator("region", mode="before")(parse_region)

    @field_validator("items", mode="before")
    @classmethod
    def _items(cls, value: object) -> object:
        if isinstance(value, (list, tuple)):  # --item NAME:X,Y,W,H[:CALIBRATION], repeatable
            return dict(parse_item(text) for text in value)
        return value or {}

    @field_validator("items")
    @classmethod
    def _item_names(cls, value: dict[str, ItemSettings]) -> dict[str, ItemSettings]:
        for name in value:
            if not re.match(ITEM_NAME, name):
                raise ValueError(
                    f"item name {name!r}: use letters, digits, '_', '.' and '-' (e.g. cap)"
                )
        return value

    @field_validator("threshold", mode="before")
    @classmethod
    def _auto_threshold(cls, value: object) -> object:
        return None if value == "auto" else value

    @field_validator("max_wait")
    @classmethod
    def _no_wait_limit(cls, value: float | None) -> float | None:
        return value or None

    def __post_init__(self) -> None:
        if self.out_dir is None:
            self.out_dir = default_out(self.camera_dir)
        if Path(self.out_dir).resolve() == Path(self.camera_dir).resolve():
            raise ValueError(
                f"--out {self.out_dir} is the camera folder; the line would score its own "
                "outputs. Choose a folder beside it (the default is CAMERA_DIR-musc-results)"
            )
        if self.items and (self.region or self.calibration or self.threshold is not None):
            raise ValueError(
                "with items, give each item its own region, calibration or threshold "
                "(items: NAME: {region: ..., calibration: ...}) instead of the line's"
            )
        if self.refresh_references and self.calibration is None and not self.items:
            raise ValueError("--refresh-references needs a --calibration to refresh")

    @property
    def judged_alone(self) -> bool:
        """Whether parts are judged by their known-good parts alone: the whole image or every
        item calibrated, and no --mutual. An uncalibrated item needs its batch or window
        anyway, so beside one every item is scored mutually."""
        calibrations = [item.calibration for item in self.items.values()] or [self.calibration]
        return not self.mutual and None not in calibrations


@dataclass(config=CONFIG)
class RunSettings(LineSettings):
    """A line plus what `musc-edge run` builds it from (see `run --help`)."""

    model: Path | None = None  # the model package (required)
    engine: Engine = Engine.auto  # type: ignore[attr-defined]
    backbone_precision: Precision | None = None
    msm_precision: Precision | None = None
    window: int | None = None  # positional MSM (docs/positional.md)
    allow_random_init: bool = False
    serve: str | None = None  # live view at HOST:PORT
    allow_remote: bool = False
    # a station of a plant's scoring service (runtime/remote.py): its URL and the line's name
    remote: str | None = None
    line: str | None = None
    remote_timeout: float = Field(120.0, gt=0)  # seconds a batch may take at the service

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.remote is not None:
            self._check_station()
        elif self.model is None:
            raise ValueError("--model is required (on the command line or in a --config file)")

    def _check_station(self) -> None:
        """What a station takes from the service is not given here too."""
        if not self.line:
            raise ValueError("--remote needs --line NAME: the line of plant.yaml this camera is")
        given = {
            "--model": self.model is not None,
            "--calibration": self.calibration is not None,
            "--region": self.region is not None,
            "--item": bool(self.items),
            "--window": self.window is not None,
            "--refresh-references": bool(self.refresh_references),
            "--mode rolling": self.mode == Mode.rolling,
        }
        if clash := [flag for flag, on in given.items() if on]:
            raise ValueError(
                f"{', '.join(clash)}: with --remote the service's plant.yaml gives the line's "
                "package, calibration and box, and scores whole batches; leave them out"
            )


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """The YAML mapping of a config file (`what`: "line config", "plant config"), or a
    one-line error saying what is wrong with it."""
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{what} {path} not found") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UsageError(f"{what} {path} is not valid YAML{where}: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{what} {path} must be a mapping of option: value")
    return data


def beside(config: Path, value: Any) -> Any:
    """A relative path given in the file, relative to the file (not to where run started)."""
    if isinstance(value, str) and not Path(value).is_absolute():
        return config.parent / value
    return value


def parse_item(text: str) -> tuple[str, dict[str, Any]]:
    """NAME:X,Y,W,H or NAME:X,Y,W,H:CALIBRATION (the `--item` flag) -> name and settings."""
    name, _, rest = str(text).partition(":")
    box, _, calibration = rest.partition(":")
    if not name or not box:
        raise UsageError(
            f"--item {text!r}: give NAME:X,Y,WIDTH,HEIGHT[:CALIBRATION], e.g. cap:0,0,400,300"
        )
    return name, {"region": box, "calibration": calibration or None}


FIELDS = {f.name: f for f in dataclasses.fields(RunSettings)}
ALIASES = {"out": "out_dir", "item": "items"}


def default_of(name: str) -> Any:
    """A field's default, for the typer option of the same name."""
    field = FIELDS[name]
    default = field.default
    return getattr(default, "default", default)


def path_fields() -> tuple[str, ...]:
    """Fields holding paths (a line config's relative paths are relative to the file)."""
    return tuple(name for name, field in FIELDS.items() if "Path" in str(field.type))


def load_settings(
    values: Mapping[str, Any], source: Mapping[str, str] | str = "settings"
) -> RunSettings:
    """Validate a mapping of options (flags, a line config, or both merged) into the model.

    `source` names where each key came from ("--batch-size", "line.yaml: batch_size"), or is
    one label for all; any problem is one UsageError naming it."""
    data = {ALIASES.get(key, key): value for key, value in values.items()}
    where = (lambda key: source.get(key, key)) if isinstance(source, Mapping) else None
    for key in data:
        refuse_unknown(key, FIELDS, where(key) if where else f"{source}: {key}")
    if "camera_dir" not in data:
        raise UsageError("--camera-dir is required (on the command line or in a --config file)")
    try:
        return RunSettings(**data)
    except ValidationError as error:
        raise UsageError(
            settings_problem(error, where or (lambda key: f"{source}: {key}"))
        ) from None


def refuse_unknown(key: str, known: Iterable[str], label: str) -> None:
    """A key no setting has: one UsageError naming it, the closest known key and all of them."""
    known = sorted(known)
    if key in known:
        return
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise UsageError(f"{label}: unknown key{hint}; the keys are {', '.join(known)}")


def settings_problem(error: ValidationError, label: Any = lambda key: key) -> str:
    """The first problem of a ValidationError on one line; `label(key)` names the field."""
    problem = error.errors()[0]
    message = problem["msg"].removeprefix("Value error, ")
    if not problem["loc"]:  # a rule over several fields: its message says it all
        return message
    first, *inner = (str(part) for part in problem["loc"])
    return f"{label(first)}{''.join('.' + part for part in inner)}: {message}"
