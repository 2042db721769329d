"""Reading camera and dataset images, and the one preprocessing every runner shares."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from musc_edge.errors import MuscEdgeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def is_image_name(name: str) -> bool:
    """An image's name, not a hidden, backup or in-progress one.

    Writers' temporary names (x.tmp, x.part, x.partial, x.crdownload, x.png~) fail the suffix
    test; dotfiles and ~$ lock files are hidden by convention.
    """
    return not name.startswith((".", "~")) and Path(name).suffix.lower() in IMAGE_SUFFIXES


def list_images(folder: Path, recursive: bool = True) -> list[Path]:
    """Image files under `folder` (or directly in it), sorted; none if it does not exist.

    Hidden folders are skipped, as hidden files are.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for parent, subfolders, names in os.walk(folder):
        subfolders[:] = (
            [name for name in subfolders if not name.startswith(".")] if recursive else []
        )
        found += [Path(parent, name) for name in names if is_image_name(name)]
    return sorted(path for path in found if path.is_file())


class ImageReadError(MuscEdgeError, ValueError):
    """An image file that cannot be decoded; the message names the file and the cause."""


def read_image(path: Path) -> np.ndarray:
    """Decode a file to an 8-bit (H, W, 3) BGR array, whatever its depth or channel count.

    16-bit images are scaled to 8 bits, grayscale is replicated to three channels and alpha
    is dropped, so that unusual but valid camera formats score like ordinary ones.
    """
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise ImageReadError(f"{path}: cannot read ({error.strerror})") from None
    if data.size == 0:
        raise ImageReadError(f"{path}: empty file")
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise ImageReadError(f"{path}: not a decodable image (corrupt, truncated or wrong format)")
    if image.dtype == np.uint16:
        image = (image // 257).astype(np.uint8)
    elif image.dtype != np.uint8:
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


def read_mask(path: Path, size: int) -> np.ndarray:
    """(size, size) bool ground-truth mask, resized like the images are."""
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ImageReadError(f"{path}: not a decodable mask image")
    return resize(mask, size) >= 128


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Square resize: INTER_AREA when shrinking (anti-aliased), INTER_CUBIC when enlarging."""
    shrinking = min(image.shape[:2]) > size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC
    return cv2.resize(image, (size, size), interpolation=interpolation)


@dataclass(frozen=True)
class Preprocess:
    """Exactly what turns a decoded image into backbone input; stored in every model package."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "cv2-area-shrink-cubic-enlarge"
    colour_order: str = "RGB"

    def __call__(self, image_bgr: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 BGR -> (3, S, S) float32 normalised RGB."""
        rgb = cv2.cvtColor(resize(image_bgr, self.image_size), cv2.COLOR_BGR2RGB)
        scaled = rgb.astype(np.float32) / 255.0
        normalised = (scaled - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(normalised.transpose(2, 0, 1))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Preprocess:
        return cls(
            int(data["image_size"]),
            tuple(data["mean"]),
            tuple(data["std"]),
            data["resize"],
            data["colour_order"],
        )
