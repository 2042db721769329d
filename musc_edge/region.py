"""A region of interest: the box of the camera image that holds the part to inspect.

A camera sees more than the part: fixture, conveyor, background. Cropping to the part before
the backbone spends every patch on it (a defect a few pixels wide in a 2000 px frame survives
a 224 px input only when the frame is cut to the part first), and keeps the background's
variation out of the score. The same box crops the known-good parts at `calibrate` and every
image on the line; a calibration records its box, and the line refuses another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from musc_edge.errors import UsageError
from musc_edge.images import ImageReadError, Preprocess
from musc_edge.size import ImageSize


class RegionOutsideImage(ImageReadError):
    """The box does not lie inside this image: the image is recorded as a failure."""


@dataclass(frozen=True)
class Region:
    """A box in image pixels: left, top, width, height."""

    x: int
    y: int
    width: int
    height: int

    @classmethod
    def parse(cls, value: Region | str | Sequence[int]) -> Region:
        """Read "x,y,width,height" or [x, y, width, height]."""
        if isinstance(value, Region):
            return value
        parts = value.split(",") if isinstance(value, str) else list(value)
        try:
            numbers = [int(part) for part in parts]
        except (TypeError, ValueError):
            numbers = []
        if len(numbers) != 4 or min(numbers[:2]) < 0 or min(numbers[2:]) < 1:
            raise UsageError(
                f"region {value!r}: give x,y,width,height in image pixels (x, y >= 0; "
                "width, height >= 1), e.g. 0,0,500,630"
            )
        return cls(*numbers)

    def to_json(self) -> list[int]:
        return [self.x, self.y, self.width, self.height]

    def __str__(self) -> str:
        return ",".join(str(n) for n in self.to_json())

    def crop(self, image: np.ndarray) -> np.ndarray:
        """The box's pixels (a view), or RegionOutsideImage when the image does not hold it."""
        height, width = image.shape[:2]
        if self.x + self.width > width or self.y + self.height > height:
            raise RegionOutsideImage(
                f"region {self} (x,y,width,height) does not fit this {width} x {height} image; "
                "check the camera's resolution or the line's region"
            )
        return image[self.y : self.y + self.height, self.x : self.x + self.width]


@dataclass(frozen=True)
class CroppedPreprocess:
    """A package's preprocessing applied to the region only (`calibrate` reads the good
    parts through it, so they are cut exactly as the line cuts every image)."""

    preprocess: Preprocess
    region: Region

    @property
    def image_size(self) -> ImageSize:
        return self.preprocess.image_size

    def __call__(self, image_bgr: np.ndarray) -> np.ndarray:
        return self.preprocess(self.region.crop(image_bgr))


def cropped(preprocess: Preprocess, region: Region | None) -> Preprocess | CroppedPreprocess:
    """`preprocess`, behind the region's crop when there is one."""
    return preprocess if region is None else CroppedPreprocess(preprocess, region)
