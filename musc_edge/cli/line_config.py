"""`musc-edge run --config line.yaml`: every `run` option and the sinks in one file.

The schema is `run`'s own options: each key is an option's name (`batch_size` or
`batch-size`), checked and converted by the same parameter type as on the command line, so the
file and the flags can never disagree on a default, a range or a choice. A flag given on the
command line wins over the file. Relative paths in the file are relative to the file's folder
(a service starts in `/`). `sinks:` maps a sink's name to its options, the same
options `--sink NAME:KEY=VALUE` takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
import yaml

from musc_edge.errors import UsageError

SINKS_KEY = "sinks"
NOT_IN_FILE = ("config", "sink")  # the file itself, and sinks (the `sinks:` mapping instead)
GIVEN = ("COMMANDLINE", "ENVIRONMENT")  # parameter sources that mean the user set the flag


def read_line_config(path: Path) -> dict[str, Any]:
    """The YAML mapping of a line config, or a one-line error saying what is wrong with it."""
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"line config {path} not found") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UsageError(f"line config {path} is not valid YAML{where}: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"line config {path} must be a mapping of option: value")
    return data


def merge_line_config(ctx: typer.Context, path: Path) -> tuple[dict[str, Any], dict]:
    """`run`'s parameters with the file's values wherever no flag was given, and its sinks.

    Unknown keys and values of the wrong type are refused, naming the key and the file."""
    data = read_line_config(path)
    params = {p.name: p for p in ctx.command.params if p.name and p.name not in NOT_IN_FILE}
    values = dict(ctx.params)
    sinks = data.pop(SINKS_KEY, None) or {}
    if not isinstance(sinks, dict) or not all(
        isinstance(options or {}, dict) for options in sinks.values()
    ):
        raise UsageError(f"{path}: sinks must map a sink's name to its options (a mapping)")
    for key, raw in data.items():
        name = str(key).replace("-", "_")
        param = params.get(name)
        if param is None:
            known = ", ".join(sorted([*params, SINKS_KEY]))
            raise UsageError(f"{path}: unknown key {key!r}; the keys are {known}")
        source = ctx.get_parameter_source(name)
        if source is not None and source.name in GIVEN:
            continue  # the flag wins
        try:
            value = param.process_value(ctx, raw)
        except typer.BadParameter as error:
            raise UsageError(f"{path}: {key}: {error.message}") from None
        if isinstance(value, Path) and not value.is_absolute():
            value = path.parent / value  # relative to the file, not to where run was started
        values[name] = value
    return values, {name: dict(options or {}) for name, options in sinks.items()}
