"""Line-like image streams with known truth, for measuring verdicts as a line would see them.

A line does not deliver a shuffled test split: a fault makes a run of bad parts, a worn tool
puts the same defect at the same place on many parts, lighting drifts over a shift. Each
builder returns `Part`s in arrival order; `write_stream` puts them into a camera folder with
increasing modification times, which is the order the line reads them in.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from musc_edge.bench.datasets import Sample
from musc_edge.errors import UsageError
from musc_edge.images import read_image
from musc_edge.visualize import write_png

GOOD = "good"


@dataclass(frozen=True)
class Part:
    """One part of a stream: where its image comes from, its truth, and how it was made."""

    name: str  # file name in the camera folder
    label: int  # 0 good, 1 defective
    kind: str  # "good", a defect type, "repeated" or "one-off"
    source: Path
    render: Callable[[np.ndarray], np.ndarray] | None = None  # edits the source image


def labelled_split(samples: Sequence[Sample], order: str, seed: int = 0) -> list[Part]:
    """A labelled test split: grouped (the good parts, then one defect type after another, as
    a line that runs well until a fault delivers a run of one defect) or shuffled."""
    if order not in ("grouped", "shuffled"):
        raise UsageError(f"order must be grouped or shuffled, got {order!r}")
    chosen = sorted(samples, key=lambda s: (s.defect != GOOD, s.defect, s.path.name))
    if order == "shuffled":
        chosen = [chosen[i] for i in np.random.default_rng(seed).permutation(len(chosen))]
    return [
        Part(f"{i:04d}_{s.defect}_{s.path.stem}{s.path.suffix}", s.label, s.defect, s.path)
        for i, s in enumerate(chosen)
    ]


def paste(piece: np.ndarray, at: tuple[float, float]) -> Callable[[np.ndarray], np.ndarray]:
    """An edit that pastes `piece` with its centre at `at` (fractions of height and width)."""

    def render(image: np.ndarray) -> np.ndarray:
        out = image.copy()
        ph, pw = piece.shape[:2]
        top = int(at[0] * image.shape[0] - ph / 2)
        left = int(at[1] * image.shape[1] - pw / 2)
        top = min(max(top, 0), image.shape[0] - ph)
        left = min(max(left, 0), image.shape[1] - pw)
        out[top : top + ph, left : left + pw] = piece
        return out

    return render


def foreign_piece(donor: np.ndarray, rng: np.random.Generator, side: int) -> np.ndarray:
    """A square cut from a random place of `donor`, turned and darkened: a piece that belongs
    to the product's own look but not where it is pasted (dirt, a chip, a stuck label)."""
    h, w = donor.shape[:2]
    top, left = rng.integers(0, h - side), rng.integers(0, w - side)
    piece = np.rot90(donor[top : top + side, left : left + side], k=int(rng.integers(1, 4)))
    return (piece.astype(np.float32) * 0.45).astype(np.uint8)


def repeated_fault(
    good: Sequence[Path],
    donor: Path,
    faulty: int = 20,
    one_off: int = 4,
    seed: int = 0,
    piece_side: int = 90,
    at: tuple[float, float] = (0.3, 0.5),
) -> list[Part]:
    """Known-good parts where `faulty` of them carry the same piece at the same place (a worn
    tool, a dirty lens) and `one_off` carry a different piece each at a random place.

    The pieces are cut from `donor`, an image of the same product that is not in the stream.
    """
    if len(good) < faulty + one_off + 1:
        raise UsageError(f"a repeated-fault stream needs more than {faulty + one_off} images")
    rng = np.random.default_rng(seed)
    donor_image = read_image(donor)
    fault = paste(foreign_piece(donor_image, rng, piece_side), at)
    parts_paths = list(good)
    roles = np.array([GOOD] * len(parts_paths), dtype=object)
    picked = rng.permutation(len(parts_paths))
    roles[picked[:faulty]] = "repeated"
    roles[picked[faulty : faulty + one_off]] = "one-off"
    parts = []
    for i, (path, role) in enumerate(zip(parts_paths, roles, strict=True)):
        render = None
        if role == "repeated":
            render = fault
        elif role == "one-off":
            where = tuple(rng.uniform(0.2, 0.8, 2))
            render = paste(foreign_piece(donor_image, rng, piece_side), where)
        name = f"{i:04d}_{role}_{path.stem}.png"
        parts.append(Part(name, int(role != GOOD), role, path, render))
    return parts


def brightness_ramp(parts: Sequence[Part], end: float = 0.75) -> list[Part]:
    """The same parts under light that dims (or brightens) linearly from 1.0 to `end` over the
    stream, as a lamp ageing or daylight over a shift does."""
    ramped = []
    for i, part in enumerate(parts):
        gain = 1.0 + (end - 1.0) * i / max(1, len(parts) - 1)

        def render(image: np.ndarray, gain=gain, inner=part.render) -> np.ndarray:
            image = inner(image) if inner else image
            return cv2.convertScaleAbs(image, alpha=gain)

        ramped.append(Part(part.name, part.label, part.kind, part.source, render))
    return ramped


def write_stream(parts: Sequence[Part], camera_dir: Path, start_ns: int | None = None) -> None:
    """Write the parts into `camera_dir` in stream order: each file's mtime one ms after the
    previous one's, so the line reads them in that order."""
    camera_dir.mkdir(parents=True, exist_ok=True)
    clock = start_ns if start_ns is not None else os.stat(camera_dir).st_mtime_ns - 10**12
    for i, part in enumerate(parts):
        target = camera_dir / part.name
        if part.render is None:
            shutil.copyfile(part.source, target)
        else:
            write_png(target, part.render(read_image(part.source)))
        stamp = clock + i * 1_000_000
        os.utime(target, ns=(stamp, stamp))
