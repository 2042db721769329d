"""`musc-edge run --config line.yaml`: every `run` option and the sinks in one file.

Each key is a setting of `runtime/settings.py`'s `RunSettings` (`batch_size` or
`batch-size`), validated by that model as the flags are, so the file and the flags can never
disagree on a default, a range or a choice, and an unknown key is refused with the closest
known one. A flag given on the command line wins over the file. Relative paths in the file are
relative to the file's folder (a service starts in `/`), an item's calibration too. `sinks:`
maps a sink's name to its options, the same options `--sink NAME:KEY=VALUE` takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from musc_edge.errors import UsageError
from musc_edge.runtime.settings import ALIASES, beside, path_fields, read_yaml_mapping

SINKS_KEY = "sinks"
ITEMS_KEY = "items"  # inspection items: name -> region, calibration, threshold
NOT_SETTINGS = ("config", "sink")  # the file itself, and sinks (the `sinks:` mapping instead)
GIVEN = ("COMMANDLINE", "ENVIRONMENT")  # parameter sources that mean the user set the flag


def read_line_config(path: Path) -> dict[str, Any]:
    """The YAML mapping of a line config, or a one-line error saying what is wrong with it."""
    return read_yaml_mapping(path, "line config")


def read_config_values(path: Path) -> tuple[dict[str, Any], dict[str, dict]]:
    """The file's settings (keys as the model spells them, relative paths made relative to
    the file) and its sinks; validation is the settings model's."""
    data = read_line_config(path)
    sinks = data.pop(SINKS_KEY, None) or {}
    if not isinstance(sinks, dict) or not all(
        isinstance(options or {}, dict) for options in sinks.values()
    ):
        raise UsageError(f"{path}: sinks must map a sink's name to its options (a mapping)")
    values = {}
    paths = path_fields()
    for key, value in data.items():
        name = str(key).replace("-", "_")
        name = ALIASES.get(name, name)
        if name in paths:
            value = beside(path, value)
        if name == ITEMS_KEY and isinstance(value, dict):  # each item's calibration
            value = {
                item: {**options, "calibration": beside(path, options.get("calibration"))}
                if isinstance(options, dict) and "calibration" in options
                else options
                for item, options in value.items()
            }
        values[name] = value
    return values, {name: dict(options or {}) for name, options in sinks.items()}


def read_items(path: Path) -> dict[str, Any]:
    """The inspection items of a line config (name -> ItemSettings), validated as `run`
    validates them; `calibrate --config` writes each item's calibration."""
    from pydantic import TypeAdapter, ValidationError

    from musc_edge.runtime.settings import ItemSettings, settings_problem

    items = read_config_values(path)[0].get("items") or {}
    try:
        return TypeAdapter(dict[str, ItemSettings]).validate_python(items)
    except ValidationError as error:
        raise UsageError(settings_problem(error, lambda key: f"{path}: items.{key}")) from None
