"""Options shared by several commands, declared once so their help text stays the same."""

from __future__ import annotations

from pathlib import Path

import typer

from musc_edge.precision import Precision
from musc_edge.runtime import settings as runtime_settings
from musc_edge.runtime.runners import ENGINES

Preset = typer.Option(
    None, "--preset", help="Preset name from configs/ or a YAML file (default dinov2-vits14-336)."
)
Backbone = typer.Option(
    None, "--backbone", "-b", help="Backbone, e.g. dinov2-vits14, ViT-L-14-336."
)
ImageSizeOption = typer.Option(
    None,
    "--image-size",
    "-s",
    help="Input size: 224 (square) or WIDTHxHEIGHT such as 224x560 to keep a camera's "
    "aspect; multiples of the patch.",
)
Layers = typer.Option(None, "--layers", help="1-based blocks, comma separated, e.g. 6,12,18,24.")
MsmPrecision = typer.Option(
    None,
    "--msm-precision",
    help="Precision of MSM's similarity products: fp32 (exact), bf16, fp16.",
)
Window = typer.Option(
    None,
    "--window",
    help="Positional MSM for fixtured, aligned parts: compare each patch only with the W x W "
    "positions around its own in the other images (odd W: 3, 5, 7). Default: every patch "
    "(MuSc's MSM). See docs/positional.md.",
)
BackbonePrecision = typer.Option(
    None,
    "--backbone-precision",
    help="Backbone arithmetic: fp32, bf16 (CPUs with AVX512-BF16/AMX), fp16 (GPU). "
    "Default: fp32 (a TensorRT engine: its build precision).",
)
Weights = typer.Option(
    None, "--weights", help="Local weights file (safetensors or torch state dict)."
)
Pretrained = typer.Option(None, "--pretrained", help="Hub tag, e.g. openai (needs hub access).")
RandomInit = typer.Option(
    False, "--random-init", help="Random weights: tests and shape checks only."
)
Device = typer.Option("auto", "--device", help="cpu, cuda, or auto (cuda when available).")

Engine = runtime_settings.Engine  # from the runner registry, the one list of engine names
EngineOpt = typer.Option(
    "auto",
    "--engine",
    help=f"Backbone runner; auto tries the engines that run on a GPU here first, then "
    f"{', '.join(ENGINES)} in that order.",
)


def parse_int_list(text: str, option: str) -> tuple[int, ...]:
    """'6,12,18,24' -> (6, 12, 18, 24), with an error naming the option for anything else."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(f"{option} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise typer.BadParameter(f"{option} needs integers >= 1, got {text!r}")
    return values


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    return None if text is None else parse_int_list(text, "--layers")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise typer.BadParameter("--device cuda asked for, but torch sees no CUDA device")
    return device


def build_config(
    preset: str | None,
    backbone: str | None,
    image_size: str | None,
    layers: str | None,
    precision: Precision | None,
):
    """The preset with command-line overrides applied."""
    from musc_edge.config import DEFAULT_PRESET, load_preset

    config = load_preset(preset or DEFAULT_PRESET)
    if backbone and backbone != config.backbone and layers is None:
        config = config.override(layers=())  # another backbone: its own default blocks
    return config.override(
        backbone=backbone,
        image_size=image_size,
        layers=parse_layers(layers),
        precision=precision.value if precision else None,
    )


def build_backbone(config, weights: Path | None, pretrained: str | None, random_init: bool):
    """The workstation backbone for a config; imports the model zoo only when needed."""
    from musc_edge.models import create_backbone

    return create_backbone(
        config.backbone,
        config.image_size,
        config.layers or None,
        weights=weights,
        pretrained=pretrained,
        random_init=random_init,
    )
