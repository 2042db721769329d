"""A model package for the torch runner alone, with random weights: what `musc-edge bench`
needs on a device that has no checkpoint and cannot fetch one.

    python tools/device_package.py --backbone auto --image-size 518 --out PKG --json INFO

The torch runner rebuilds the backbone from musc.json (weights_source "random-init", seeded
the same everywhere), so no ONNX graph or engine is written: exporting ViT-L at 518 to ONNX
and checking it on the CPU would take minutes of a short device lease. `--backbone auto`
takes the MuSc paper's CLIP ViT-L-14-336 where open_clip imports and otherwise DINOv2
ViT-L/14 (timm), the same transformer shape at the same grid (width 1024, 24 blocks, 37 x 37
patches at 518 px), so the same arithmetic per image.
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

PAPER_BACKBONE = "ViT-L-14-336"
FALLBACK_BACKBONE = "dinov2-vitl14"


def choose_backbone(asked: str) -> tuple[str, str]:
    """The backbone to build and why it was chosen."""
    if asked != "auto":
        return asked, "asked for"
    try:
        import open_clip  # noqa: F401
    except ImportError as error:
        return FALLBACK_BACKBONE, f"open_clip does not import here ({error}); same ViT-L/14 shape"
    return PAPER_BACKBONE, "the MuSc paper's backbone; open_clip imports"


def write_package(
    folder: Path, backbone: str, image_size: str, preset: str, max_batch: int
) -> dict:
    """Build the random-init backbone once to read its output widths, write musc.json."""
    import torch

    from musc_edge.cli.options import build_config
    from musc_edge.models import create_backbone
    from musc_edge.package import ModelPackage

    config = build_config(preset, backbone, image_size, None, None)
    model = create_backbone(config.backbone, config.image_size, config.layers, random_init=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.inference_mode():
        size = config.image_size.hw
        tokens, embedding = model.to(device)(torch.zeros(1, 3, *size, device=device))
    folder.mkdir(parents=True, exist_ok=True)
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("musc-edge", "torch", "timm", "open_clip_torch"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    package = ModelPackage(
        backbone=model.spec.name,
        weights_source=model.weights.source,
        weights_sha256=None,
        image_size=model.image_size.to_json(),
        patch_size=model.spec.patch_size,
        layers=list(model.layers),
        token_dim=int(tokens[0].shape[-1]),
        embedding_dim=int(embedding.shape[-1]),
        preprocess=model.preprocess.to_dict(),
        precision="fp16",  # the TensorRT engine's, were one built; the torch runner ignores it
        max_batch=max_batch,
        musc=config.musc_settings(),
        versions=versions,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        folder=folder,
    )
    package.write()
    return {
        "backbone": package.backbone,
        "image_size": package.image_size,
        "layers": package.layers,
        "token_dim": package.token_dim,
        "max_batch": package.max_batch,
        "folder": str(folder),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="auto", help="a registry name, or auto")
    parser.add_argument("--image-size", default="518")
    parser.add_argument("--preset", default="musc-paper", help="MuSc settings (r, frac, k)")
    parser.add_argument("--max-batch", type=int, default=8, help="images per backbone call")
    parser.add_argument("--out", type=Path, required=True, help="package folder")
    parser.add_argument("--json", type=Path, help="write what was built here")
    args = parser.parse_args()
    backbone, because = choose_backbone(args.backbone)
    info = write_package(args.out, backbone, args.image_size, args.preset, args.max_batch)
    info["chosen_because"] = because
    print(json.dumps(info))
    if args.json:
        args.json.write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
