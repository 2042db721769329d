"""What the line writes besides the journal: overlays, masks, batch manifests, rejected files.

Everything is written atomically (temporary name, then rename) so a crash leaves either the
old file or the new one, and a batch scored again after a crash simply overwrites its own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import torch

from musc_edge.files import write_json_atomic
from musc_edge.musc import MuScResult
from musc_edge.visualize import overlay, write_png

PREVIEW_SIDE = 1024  # overlays are for eyes: bound their size, and the memory held per image
REJECTED_DIR = "rejected"
MANIFEST_FILE = "manifest.json"


def batch_dir(out_dir: Path, batch: int) -> Path:
    return out_dir / "batches" / f"{batch:06d}"


def preview(image_bgr: np.ndarray) -> np.ndarray:
    """The image shrunk so its longer side is at most PREVIEW_SIDE."""
    scale = PREVIEW_SIDE / max(image_bgr.shape[:2])
    if scale >= 1:
        return image_bgr
    size = (round(image_bgr.shape[1] * scale), round(image_bgr.shape[0] * scale))
    return cv2.resize(image_bgr, size, interpolation=cv2.INTER_AREA)


def pixel_map(patch_map: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """The core's pixel map (bilinear, align_corners=True) at the image's own size."""
    peak = patch_map.amax()[None]
    return MuScResult(patch_map[None], peak, peak).pixel_maps(shape)[0].cpu().numpy()


def write_visuals(
    out_dir: Path,
    batch: int,
    file: str,
    image_preview: np.ndarray,
    heat: np.ndarray,
    patch_map: torch.Tensor,
    shape: tuple[int, int],
    mask_threshold: float | None,
) -> tuple[str, str | None]:
    """Overlay PNG (heat over the preview) and, with a threshold, the binary mask PNG at the
    image's own size (pixels whose patch distance is above it); paths relative to OUT.
    """
    folder = batch_dir(out_dir, batch)
    name = Path(file).with_suffix(".png")
    overlay_path = folder / "overlays" / name
    write_png(overlay_path, overlay(image_preview, heat))
    if mask_threshold is None:
        return overlay_path.relative_to(out_dir).as_posix(), None
    mask_path = folder / "masks" / name
    write_png(mask_path, (pixel_map(patch_map, shape) > mask_threshold).astype(np.uint8) * 255)
    return overlay_path.relative_to(out_dir).as_posix(), mask_path.relative_to(out_dir).as_posix()


def write_manifest(folder: Path, summary: dict) -> None:
    write_json_atomic(folder / MANIFEST_FILE, summary)


def read_manifest(path: Path) -> dict:
    return json.loads(path.read_text())


def set_aside(out_dir: Path, path: Path, file: str, sha256: str | None) -> str | None:
    """Copy a file that could not be scored into OUT/rejected/; the original stays put.

    A later different file with the same name gets its hash in the name, so no earlier copy
    is ever overwritten. Returns the copy's path relative to OUT, or None if it is unreadable.
    """
    target = out_dir / REJECTED_DIR / file
    if target.exists() and sha256:
        target = target.with_name(f"{target.stem}-{sha256[:12]}{target.suffix}")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(path, target)
    except OSError:
        return None
    return target.relative_to(out_dir).as_posix()
