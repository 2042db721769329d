"""Heatmap overlays and binary masks as PNG, written atomically so no reader sees half a file."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from musc_edge.files import write_atomic


def normalise_maps(maps: np.ndarray, mode: str = "batch") -> np.ndarray:
    """Scale (N, H, W) maps to [0, 1], over the whole batch or per image."""
    if mode not in ("batch", "image"):
        raise ValueError(f"map normalisation must be 'batch' or 'image', got {mode!r}")
    axes = None if mode == "batch" else (1, 2)
    low = maps.min(axis=axes, keepdims=True)
    spread = maps.max(axis=axes, keepdims=True) - low
    return (maps - low) / np.where(spread > 0, spread, 1)


def overlay(image_bgr: np.ndarray, heat01: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Colour the [0, 1] map (JET) over the image at the image's own resolution."""
    height, width = image_bgr.shape[:2]
    heat = cv2.resize(
        (heat01 * 255).astype(np.uint8), (width, height), interpolation=cv2.INTER_LINEAR
    )
    return cv2.addWeighted(
        image_bgr, 1 - alpha, cv2.applyColorMap(heat, cv2.COLORMAP_JET), alpha, 0
    )


def write_png(path: Path, image: np.ndarray) -> None:
    """Encode, then write atomically (see musc_edge.files)."""
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"could not encode {path}")
    write_atomic(path, data.tobytes())
