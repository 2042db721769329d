"""Where the line's files go in the out folder, and the pieces the sinks draw them from.

Overlays and masks are named after the whole camera file name, suffix case included
(`part.tif` -> `part_tif.png`, `part.TIF` -> `part_TIF.png`), so two files that share a stem
never overwrite each other's outputs. Every derived name is valid UTF-8 and short enough for
the file system, whatever the camera's name was (`musc_edge.names`).
"""

from __future__ import annotations

import shutil
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
import torch

from musc_edge.musc import MuScResult
from musc_edge.names import safe_part

PREVIEW_SIDE = 1024  # overlays are for eyes: bound their size, and the memory held per image
REJECTED_DIR = "rejected"


def batch_folder(batch: int) -> PurePosixPath:
    """A batch's folder relative to the out folder: batches/NNNNNN."""
    return PurePosixPath("batches", f"{batch:06d}")


def batch_dir(out_dir: Path, batch: int) -> Path:
    return out_dir / batch_folder(batch)


def safe_path(file: str, suffix: str = "") -> PurePosixPath:
    """A camera file's relative path with every part made safe to write (`names.safe_part`)
    and `suffix` added to the last part."""
    *folders, name = PurePosixPath(file).parts
    return PurePosixPath(*(safe_part(folder) for folder in folders), safe_part(name, suffix))


def output_name(file: str) -> str:
    """The PNG name of a camera file's overlay and mask: unique per camera file, because
    image suffixes hold no underscore and their case is kept."""
    path = PurePosixPath(file)
    stem = path.with_name(path.stem).as_posix()
    return safe_path(stem, f"_{path.suffix.lstrip('.')}.png").as_posix()


def visual_paths(batch: int, file: str, with_mask: bool) -> tuple[str, str | None]:
    """(overlay, mask) paths relative to the out folder for one scored file."""
    folder = batch_folder(batch)
    name = output_name(file)
    return str(folder / "overlays" / name), str(folder / "masks" / name) if with_mask else None


def preview(image_bgr: np.ndarray) -> np.ndarray:
    """The image shrunk so its longer side is at most PREVIEW_SIDE."""
    scale = PREVIEW_SIDE / max(image_bgr.shape[:2])
    if scale >= 1:
        return image_bgr
    # a 3000 x 1 image must not round to zero rows
    size = tuple(max(1, round(side * scale)) for side in image_bgr.shape[1::-1])
    return cv2.resize(image_bgr, size, interpolation=cv2.INTER_AREA)


def pixel_map(patch_map: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """The core's pixel map (bilinear, align_corners=True) at the image's own size."""
    peak = patch_map.amax()[None]
    return MuScResult(patch_map[None], peak, peak).pixel_maps(shape)[0].cpu().numpy()


def set_aside(out_dir: Path, path: Path, file: str, sha256: str | None) -> str | None:
    """Copy a file that could not be scored into OUT/rejected/; the original stays put.

    A later different file with the same name gets its hash in the name, so no earlier copy
    is ever overwritten. Returns the copy's path relative to OUT, or None if it is unreadable.
    """
    target = out_dir / REJECTED_DIR / safe_path(file)
    if target.exists() and sha256:
        stem = target.with_name(target.stem).relative_to(out_dir).as_posix()
        target = out_dir / safe_path(stem, f"-{sha256[:12]}{target.suffix}")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(path, target)
    except OSError:
        return None
    return target.relative_to(out_dir).as_posix()
