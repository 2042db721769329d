"""Generated product images for demos and benchmarks on machines without a dataset.

Each image is a round machined part (a washer with a fine radial texture) on a conveyor-grey
background, slightly shifted and rotated like parts on a line; a chosen few carry a drawn
defect (a dark scratch or a bright blob). Deterministic for a seed.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from musc_edge.visualize import write_png


def part_image(size: int, rng: np.random.Generator, defect: bool) -> np.ndarray:
    """One (size, size, 3) uint8 BGR image of a part, with a defect if asked."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    centre = size / 2 + rng.uniform(-0.03, 0.03, 2) * size
    dy, dx = yy - centre[0], xx - centre[1]
    radius = np.hypot(dy, dx) / size
    angle = np.arctan2(dy, dx) + rng.uniform(0, 2 * np.pi)
    texture = 0.5 + 0.08 * np.sin(angle * 90) + 0.05 * np.sin(radius * 180)
    part = (radius > 0.12) & (radius < 0.38)
    grey = np.where(part, texture * 200, 70.0) + rng.normal(0, 4, (size, size))
    image = np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    if defect:
        theta = rng.uniform(0, 2 * np.pi)
        r = rng.uniform(0.18, 0.32) * size
        point = (int(centre[1] + r * np.cos(theta)), int(centre[0] + r * np.sin(theta)))
        if rng.random() < 0.5:
            end = (
                point[0] + int(rng.uniform(-0.12, 0.12) * size),
                point[1] + int(rng.uniform(-0.12, 0.12) * size),
            )
            cv2.line(image, point, end, (25, 25, 25), max(2, size // 90))
        else:
            cv2.circle(image, point, max(3, size // 30), (235, 235, 245), -1)
    return image


def write_parts(
    folder: Path, count: int, size: int = 256, defect_every: int = 6, seed: int = 0
) -> list[tuple[Path, int]]:
    """Write `count` PNGs into folder; every `defect_every`-th part is defective.

    Returns (path, label) pairs, label 1 for a defective part.
    """
    rng = np.random.default_rng(seed)
    written = []
    for index in range(count):
        defect = index % defect_every == defect_every - 1
        path = Path(folder) / f"part_{index:04d}.png"
        write_png(path, part_image(size, rng, defect))
        written.append((path, int(defect)))
    return written
