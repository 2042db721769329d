"""The backbone's input size: square (224) or width x height (224x560), as the camera's
aspect asks.

Squashing a 500 x 1260 image into 224 x 224 shrinks its long side 5.6 times and a thin crack
with it; keeping the aspect keeps the defect's shape (docs/verdicts.md measures it). Packages
store a square size as one number, as they always have, and any other as [height, width].
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from musc_edge.errors import UsageError

SIZE_TEXT = re.compile(r"^\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?$")


@dataclass(frozen=True)
class ImageSize:
    """Height and width in pixels of what the backbone sees."""

    height: int
    width: int

    @classmethod
    def parse(cls, value: ImageSize | int | str | Sequence[int]) -> ImageSize:
        """224, "224", "224x560" (WIDTHxHEIGHT, as cameras state it) or [height, width]."""
        if isinstance(value, ImageSize):
            return value
        if isinstance(value, bool):
            raise UsageError(f"an image size is a number or WIDTHxHEIGHT, got {value!r}")
        if isinstance(value, int):
            return cls.checked(value, value)
        if isinstance(value, str):
            match = SIZE_TEXT.match(value)
            if not match:
                raise UsageError(
                    f"image size {value!r}: give one number (224) or WIDTHxHEIGHT (224x560)"
                )
            width = int(match.group(1))
            return cls.checked(int(match.group(2) or width), width)
        if len(value) == 2:
            return cls.checked(int(value[0]), int(value[1]))
        raise UsageError(f"an image size is a number or [height, width], got {value!r}")

    @classmethod
    def checked(cls, height: int, width: int) -> ImageSize:
        if height < 1 or width < 1:
            raise UsageError(f"image size {width}x{height}: both sides must be at least 1 pixel")
        return cls(height, width)

    @property
    def is_square(self) -> bool:
        return self.height == self.width

    @property
    def hw(self) -> tuple[int, int]:
        return self.height, self.width

    def grid(self, patch_size: int) -> tuple[int, int]:
        """The (rows, columns) patch grid at `patch_size`."""
        return self.height // patch_size, self.width // patch_size

    def check_multiple(self, patch_size: int, name: str) -> None:
        """Refuse a size the patch does not divide, naming the nearest that works."""
        if self.height % patch_size or self.width % patch_size:
            nearest = ImageSize(
                max(patch_size, self.height // patch_size * patch_size),
                max(patch_size, self.width // patch_size * patch_size),
            )
            raise UsageError(
                f"image size {self} is not a multiple of {name}'s patch size {patch_size} "
                f"on both sides; try {nearest}"
            )

    def to_json(self) -> int | list[int]:
        """One number when square (as packages always stored it), else [height, width]."""
        return self.height if self.is_square else [self.height, self.width]

    def __str__(self) -> str:
        return str(self.height) if self.is_square else f"{self.width}x{self.height}"
