"""Presets: named YAML files in configs/ that fix a backbone, resolution and MuSc settings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from importlib import resources
from pathlib import Path

import yaml

from musc_edge.errors import UsageError
from musc_edge.size import ImageSize

DEFAULT_PRESET = "dinov2-vits14-336"


@dataclass(frozen=True)
class MuScConfig:
    """Everything that decides a score; written next to every result."""

    backbone: str = "dinov2-vits14"
    image_size: ImageSize | int | str = 224  # one number: square; "224x560": WIDTHxHEIGHT
    layers: tuple[int, ...] | None = None  # 1-based blocks; None = the backbone's default
    r_list: tuple[int, ...] = (1, 3, 5)
    frac: float = 0.3
    k_list: tuple[int, ...] = (1, 2, 3)
    precision: str = "fp32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", ImageSize.parse(self.image_size))

    def override(self, **changes: object) -> MuScConfig:
        """A copy with the given fields replaced; None values leave a field as it is."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        return {**asdict(self), "image_size": self.image_size.to_json()}

    def musc_settings(self) -> dict:
        """The MuSc settings a model package records (musc.json's `musc`)."""
        return {
            "r_list": list(self.r_list),
            "frac": self.frac,
            "k_list": list(self.k_list),
            "precision": self.precision,
        }


def available_presets() -> list[str]:
    return sorted(
        p.name[:-5]
        for p in resources.files("musc_edge.configs").iterdir()
        if p.name.endswith(".yaml")
    )


def load_preset(name_or_path: str | Path) -> MuScConfig:
    """A preset by name (configs/NAME.yaml) or from a YAML file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        text = path.read_text()
    else:
        try:
            text = resources.files("musc_edge.configs").joinpath(f"{name_or_path}.yaml").read_text()
        except FileNotFoundError:
            raise UsageError(
                f"unknown preset {name_or_path!r}; choose one of {', '.join(available_presets())} "
                "or pass a YAML file"
            ) from None
    data = yaml.safe_load(text) or {}
    known = {f.name for f in fields(MuScConfig)}
    unknown = set(data) - known
    if unknown:
        raise UsageError(f"preset {name_or_path}: unknown keys {sorted(unknown)}")
    for key in ("layers", "r_list", "k_list"):
        if data.get(key) is not None:
            data[key] = tuple(data[key])
    return MuScConfig(**data)
