"""Reading camera and dataset images, and the one preprocessing every runner shares."""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from musc_edge.errors import MuscEdgeError
from musc_edge.size import ImageSize

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


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


# Images are refused above this many pixels (100 MP, more than line cameras deliver): what one
# decoded image may cost in memory is bounded by it, whatever a file's header claims.
DEFAULT_MAX_PIXELS = 100_000_000
# Large images are decoded at 1/2, 1/4 or 1/8 size where their shorter side stays at least
# this (JPEG then decodes fewer coefficients): still sharper than any model input or overlay.
REDUCED_SIDE = 1024
_REDUCED = {
    8: cv2.IMREAD_REDUCED_COLOR_8,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    2: cv2.IMREAD_REDUCED_COLOR_2,
}


@dataclass(frozen=True)
class ImageInfo:
    """What a file's header says, read without decoding its pixels."""

    width: int
    height: int
    frames: int  # pages of a multi-page TIFF; 1 otherwise
    format: str

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _cause(error: BaseException) -> str:
    """An exception as one short line: its type and, if it has one, its message."""
    text = " ".join(str(error).split())
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def probe_image(path: Path) -> ImageInfo:
    """The header of an image file; an ImageReadError for anything that is not one.

    Whatever the header reader raises on a file (a fuzzed or half-written file makes PIL raise
    TypeError, SyntaxError, ValueError, struct.error, ...) is that file's problem and becomes an
    ImageReadError; only interrupts (KeyboardInterrupt, SystemExit) pass through.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # complaints about half-written files are not news
            with Image.open(path) as image:
                width, height = image.size
                try:  # walks every page's header: where a half-written multi-page TIFF fails
                    frames = int(getattr(image, "n_frames", 1))
                except Exception as error:
                    raise ImageReadError(
                        f"{path}: the headers of its pages after the first cannot be read "
                        f"(truncated or corrupt multi-page file; {_cause(error)})"
                    ) from None
                return ImageInfo(int(width), int(height), max(frames, 1), image.format or "")
    except ImageReadError:
        raise
    except Image.DecompressionBombError:
        raise ImageReadError(f"{path}: declared size far above --max-pixels; not decoded") from None
    except OSError as error:  # PIL.UnidentifiedImageError is an OSError too
        empty = path.is_file() and path.stat().st_size == 0
        reason = "empty file" if empty else "not a decodable image header"
        raise ImageReadError(f"{path}: {reason} ({type(error).__name__})") from None
    except Exception as error:  # MemoryError included: a header claiming absurd sizes
        raise ImageReadError(f"{path}: not a decodable image header ({_cause(error)})") from None


def read_image(
    path: Path,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    info: ImageInfo | None = None,
    full_resolution: bool = False,
) -> np.ndarray:
    """Decode a file to an 8-bit (H, W, 3) BGR array, whatever its depth or channel count.

    The header is checked first: more than `max_pixels` is refused before any decoding, and
    very large images are decoded reduced, unless `full_resolution` (a region of interest is
    given in the file's own pixels, and wants them all). 16-bit images are scaled to 8 bits,
    grayscale is replicated to three channels and alpha is dropped, so that unusual but valid
    camera formats score like ordinary ones. Multi-page files give their first page.
    """
    path = Path(path)
    info = info or probe_image(path)
    if info.pixels > max_pixels:
        raise ImageReadError(
            f"{path}: {info.width} x {info.height} pixels is above the limit of {max_pixels} "
            "(--max-pixels); not decoded"
        )
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise ImageReadError(f"{path}: cannot read ({error.strerror})") from None
    side = min(info.width, info.height)
    reduce = 1 if full_resolution else next((f for f in _REDUCED if side // f >= REDUCED_SIDE), 1)
    try:
        image = cv2.imdecode(data, _REDUCED[reduce] if reduce > 1 else cv2.IMREAD_UNCHANGED)
    except cv2.error as error:
        raise ImageReadError(f"{path}: the decoder failed ({error.err or _cause(error)})") from None
    except Exception as error:  # MemoryError included
        raise ImageReadError(f"{path}: the decoder failed ({_cause(error)})") from None
    if image is None or image.size == 0:
        raise ImageReadError(f"{path}: not a decodable image (corrupt, truncated or wrong format)")
    height, width = image.shape[:2]
    if height * width > max_pixels:  # the pixel decoder read another size than the header
        raise ImageReadError(
            f"{path}: decoded to {width} x {height} pixels, above the limit of {max_pixels} "
            f"(--max-pixels), though its header says {info.width} x {info.height}; not used"
        )
    try:
        return _to_bgr8(image)
    except Exception as error:
        raise ImageReadError(f"{path}: cannot convert its pixels ({_cause(error)})") from None


def _to_bgr8(image: np.ndarray) -> np.ndarray:
    """8-bit three-channel BGR from whatever depth and channel count OpenCV decoded."""
    channels = 1 if image.ndim == 2 else image.shape[2]
    if image.ndim not in (2, 3) or channels not in (1, 2, 3, 4):
        raise ValueError(f"{channels} channels of shape {image.shape}; not a camera image")
    if image.dtype == np.uint16:
        image = (image // 257).astype(np.uint8)
    elif image.dtype != np.uint8:
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if image.ndim == 3 and channels <= 2:  # grey, or grey and alpha
        image = np.ascontiguousarray(image[..., 0])
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


def read_mask(path: Path, size: ImageSize) -> np.ndarray:
    """(height, width) bool ground-truth mask, resized like the images are, at half level."""
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ImageReadError(f"{path}: not a decodable mask image")
    return resize(mask, size) >= 128


def resize_antialiased(image: np.ndarray, size: ImageSize, mode: str) -> np.ndarray:
    """uint8 resize as PIL does it (what torchvision's Resize on a PIL image, and so
    the original MuSc, uses): torch's antialiased uint8 kernels, within 1-2 levels of PIL."""
    pixels = torch.from_numpy(np.ascontiguousarray(image))
    planar = pixels.permute(2, 0, 1)[None] if image.ndim == 3 else pixels[None, None]
    out = F.interpolate(planar, size=size.hw, mode=mode, antialias=True, align_corners=False)
    return (out[0].permute(1, 2, 0) if image.ndim == 3 else out[0, 0]).numpy()


def resize_cv2_area_cubic(image: np.ndarray, size: ImageSize) -> np.ndarray:
    """INTER_AREA when shrinking, INTER_CUBIC when enlarging: packages exported before 0.2."""
    shrinking = image.shape[0] > size.height and image.shape[1] > size.width
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC
    return cv2.resize(image, (size.width, size.height), interpolation=interpolation)


# Resize methods by the name a model package records; the backbone spec picks one at export.
RESIZERS = {
    "pil-bilinear": lambda image, size: resize_antialiased(image, size, "bilinear"),
    "pil-bicubic": lambda image, size: resize_antialiased(image, size, "bicubic"),
    "cv2-area-shrink-cubic-enlarge": resize_cv2_area_cubic,
}
DEFAULT_RESIZE = "pil-bilinear"


def resize(image: np.ndarray, size: ImageSize | int, method: str = DEFAULT_RESIZE) -> np.ndarray:
    """Resize a uint8 image to `size` (one number: square) by a named method (see RESIZERS)."""
    try:
        resizer = RESIZERS[method]
    except KeyError:
        raise ImageReadError(
            f"unknown resize method {method!r}; this musc-edge knows {', '.join(RESIZERS)}"
        ) from None
    return resizer(image, ImageSize.parse(size))


@dataclass(frozen=True)
class Preprocess:
    """Exactly what turns a decoded image into backbone input; stored in every model package."""

    image_size: ImageSize
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = DEFAULT_RESIZE
    colour_order: str = "RGB"

    def __post_init__(self) -> None:  # one number means square, as old packages store it
        object.__setattr__(self, "image_size", ImageSize.parse(self.image_size))

    def __call__(self, image_bgr: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 BGR -> (3, height, width) float32 normalised RGB."""
        return self.normalise(self.resized(image_bgr))

    def resized(self, image_bgr: np.ndarray) -> np.ndarray:
        """The image at the backbone's size, still 8-bit BGR: what a station sends to a
        scoring service (a third of the float tensor's bytes, docs/deployment.md)."""
        return resize(image_bgr, self.image_size, self.resize)

    def normalise(self, resized_bgr: np.ndarray) -> np.ndarray:
        """A `resized` image -> (3, height, width) float32 normalised RGB."""
        rgb = cv2.cvtColor(resized_bgr, cv2.COLOR_BGR2RGB)
        scaled = rgb.astype(np.float32) / 255.0
        normalised = (scaled - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(normalised.transpose(2, 0, 1))

    def to_dict(self) -> dict:
        return {**asdict(self), "image_size": self.image_size.to_json()}

    @classmethod
    def from_dict(cls, data: dict) -> Preprocess:
        return cls(
            ImageSize.parse(data["image_size"]),
            tuple(data["mean"]),
            tuple(data["std"]),
            data["resize"],
            data["colour_order"],
        )
