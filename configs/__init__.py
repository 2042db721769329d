"""YAML presets, shipped with the package so that `--preset NAME` works from any install."""
