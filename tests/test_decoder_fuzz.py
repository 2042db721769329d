"""Decoder fuzz: whatever bytes land in a camera file, the camera's path (probe_image, then
read_image, as CameraDir._load calls them) gives an (H, W, 3) uint8 image or an ImageReadError,
never another exception: a decoder's complaint about a file is that file's problem.

Seeded and bounded in time; run with -s to see the counts per format.
"""

from __future__ import annotations

import io
import struct
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from musc_edge import images
from musc_edge.images import ImageReadError, is_image_name, probe_image, read_image

MAX_PIXELS = 4_000_000  # a small --max-pixels, as a camera line may set
BUDGET_S = 20.0  # stop generating mutations after this much wall time
TARGET_CASES = 5_000
MIN_CASES = 1_000  # what even a slow machine must get through within the budget
INTERESTING_BYTES = (0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE)
INTERESTING_WORDS = (
    0, 1, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
)  # fmt: skip


@pytest.fixture(autouse=True)
def quiet_opencv() -> Iterator[None]:
    """As the camera does: OpenCV's complaints about broken files are not news."""
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    yield
    cv2.utils.logging.setLogLevel(level)


def picture(height: int = 24, width: int = 32, seed: int = 0) -> np.ndarray:
    """A small BGR part-like image: gradients and a little noise, so encoders compress it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    planes = [x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)]
    base = np.stack(planes, axis=-1).astype(np.int16) + rng.integers(-8, 9, (height, width, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def encoded(suffix: str, image: np.ndarray, params: tuple[int, ...] = ()) -> bytes:
    ok, data = cv2.imencode(suffix, image, list(params))
    assert ok, suffix
    return data.tobytes()


def multi_page_tiff(pages: int = 3, compression: str | None = None) -> bytes:
    frames = [Image.fromarray(picture(seed=page)[..., ::-1]) for page in range(pages)]
    out = io.BytesIO()
    frames[0].save(
        out, format="TIFF", save_all=True, append_images=frames[1:], compression=compression
    )
    return out.getvalue()


def seed_files() -> dict[str, tuple[str, bytes]]:
    """Small valid files, by name: (suffix, bytes)."""
    image = picture()
    return {
        "png": (".png", encoded(".png", image)),
        "png-16bit-gray": (".png", encoded(".png", image[..., 0].astype(np.uint16) * 257)),
        "jpeg": (".jpg", encoded(".jpg", image)),
        "jpeg-progressive": (".jpg", encoded(".jpg", image, (cv2.IMWRITE_JPEG_PROGRESSIVE, 1))),
        "bmp": (".bmp", encoded(".bmp", image)),
        "tiff": (".tif", encoded(".tiff", image)),
        "tiff-3-pages": (".tiff", multi_page_tiff()),
        "tiff-3-pages-lzw": (".tiff", multi_page_tiff(compression="tiff_lzw")),
        "tiff-16bit": (".tif", encoded(".tiff", image.astype(np.uint16) * 257)),
        "webp": (".webp", encoded(".webp", image, (cv2.IMWRITE_WEBP_QUALITY, 80))),
        "webp-lossless": (".webp", encoded(".webp", image, (cv2.IMWRITE_WEBP_QUALITY, 101))),
    }


def header_offsets(data: bytes) -> list[int]:
    """Where a file's structure lives: its first 64 bytes, and every TIFF IFD (which may sit
    anywhere in the file), so that header mutations hit fields a parser reads."""
    offsets = list(range(min(64, len(data))))
    if len(data) < 8 or data[:4] not in (b"II*\x00", b"MM\x00*"):
        return offsets
    order = "<" if data[:2] == b"II" else ">"
    ifd, seen = struct.unpack(order + "I", data[4:8])[0], set()
    while 8 <= ifd < len(data) - 2 and ifd not in seen:
        seen.add(ifd)
        entries = struct.unpack(order + "H", data[ifd : ifd + 2])[0]
        end = min(len(data), ifd + 2 + 12 * entries + 4)
        offsets += range(ifd, end)
        if end - ifd < 2 + 12 * entries + 4:
            break
        ifd = struct.unpack(order + "I", data[end - 4 : end])[0]
    return offsets


def mutate(data: bytes, kind: str, rng: np.random.Generator, header: list[int]) -> bytes:
    blob = bytearray(data)
    size = len(blob)
    if kind == "bit-flips":
        for position in rng.integers(0, size, size=int(rng.integers(1, 9))):
            blob[position] ^= 1 << int(rng.integers(0, 8))
    elif kind == "byte-overwrites":
        for position in rng.integers(0, size, size=int(rng.integers(1, 5))):
            blob[position] = INTERESTING_BYTES[int(rng.integers(len(INTERESTING_BYTES)))]
    elif kind == "truncation":
        blob = blob[: int(rng.integers(0, size))]
    elif kind == "chunk-duplication":
        start = int(rng.integers(0, size))
        chunk = blob[start : start + int(rng.integers(1, max(2, size // 4)))]
        at = int(rng.integers(0, size + 1))
        blob[at:at] = chunk
    elif kind == "header-field":
        width = (1, 2, 4)[int(rng.integers(3))]
        value = INTERESTING_WORDS[int(rng.integers(len(INTERESTING_WORDS)))] & (
            (1 << (8 * width)) - 1
        )
        order = ("little", "big")[int(rng.integers(2))]
        position = header[int(rng.integers(len(header)))]
        blob[position : position + width] = value.to_bytes(width, order)
    else:
        raise AssertionError(kind)
    return bytes(blob)


def fix_png_crcs(data: bytes) -> bytes:
    """Recompute the CRC of every whole chunk, so that a mutation reaches past libpng's CRC
    check into the chunk parsers and the inflater."""
    blob = bytearray(data)
    position = 8
    while position + 12 <= len(blob):
        length = struct.unpack(">I", blob[position : position + 4])[0]
        end = position + 8 + length
        if end + 4 > len(blob):
            break
        blob[end : end + 4] = struct.pack(">I", zlib.crc32(blob[position + 4 : end]))
        position = end + 4
    return bytes(blob)


KINDS = ("bit-flips", "byte-overwrites", "truncation", "chunk-duplication", "header-field")


def cases(seed: int = 20240611) -> Iterator[tuple[str, str, str, bytes]]:
    """(format, mutation, suffix, bytes) round-robin over formats and mutation kinds; one in
    five cases stacks a second mutation on the first, and half the PNGs get valid CRCs."""
    rng = np.random.default_rng(seed)
    seeds = seed_files()
    headers = {name: header_offsets(data) for name, (_, data) in seeds.items()}
    while True:
        for kind in KINDS:
            for name, (suffix, data) in seeds.items():
                blob = mutate(data, kind, rng, headers[name])
                label = kind
                if rng.random() < 0.2 and blob:
                    second = KINDS[int(rng.integers(len(KINDS)))]
                    blob = mutate(blob, second, rng, header_offsets(blob))
                    label = f"{kind}+{second}"
                if suffix == ".png" and rng.random() < 0.5:
                    blob, label = fix_png_crcs(blob), f"{label}+crc"
                yield name, label, suffix, blob


def camera_path(
    path: Path,
    probe: Callable = probe_image,
    read: Callable = read_image,
    error: type[Exception] = ImageReadError,
) -> tuple[str, np.ndarray | None]:
    """What CameraDir._load does with a file: probe the header, then decode within the pixel
    limit. ("decoded", image) or ("refused", None); anything else escapes."""
    try:
        header = probe(path)
        return "decoded", read(path, MAX_PIXELS, header)
    except error:
        return "refused", None


def run_fuzz(
    folder: Path,
    budget_s: float = BUDGET_S,
    target: int = TARGET_CASES,
    probe: Callable = probe_image,
    read: Callable = read_image,
    error: type[Exception] = ImageReadError,
    seed: int = 20240611,
) -> tuple[dict[str, Counter], list[tuple[str, str, str]]]:
    """Counts of outcomes per format, and the escapes as (format, mutation, exception)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    escaped = []
    deadline = time.monotonic() + budget_s
    for index, (name, kind, suffix, blob) in enumerate(cases(seed)):
        if index == target or time.monotonic() > deadline:
            break
        path = folder / f"case{suffix}"
        path.write_bytes(blob)
        try:
            outcome, image = camera_path(path, probe, read, error)
        except Exception as exception:  # what the camera would not have caught
            counts[name]["escaped"] += 1
            escaped.append((name, kind, f"{type(exception).__name__}: {exception}"))
            continue
        counts[name][outcome] += 1
        if image is not None:
            assert image.ndim == 3 and image.shape[2] == 3, (name, kind, image.shape)
            assert image.dtype == np.uint8 and image.size > 0, (name, kind, image.dtype)
    return counts, escaped


def report(counts: dict[str, Counter]) -> str:
    lines = [f"{'format':<18}{'cases':>7}{'decoded':>9}{'refused':>9}{'escaped':>9}"]
    for name, count in counts.items():
        total = sum(count.values())
        row = [count["decoded"], count["refused"], count["escaped"]]
        lines.append(f"{name:<18}{total:>7}" + "".join(f"{value:>9}" for value in row))
    return "\n".join(lines)


def test_seed_files_are_valid_and_decode_through_the_camera_path(tmp_path: Path) -> None:
    for name, (suffix, data) in seed_files().items():
        path = tmp_path / f"{name}{suffix}"
        path.write_bytes(data)
        assert is_image_name(path.name), name
        outcome, image = camera_path(path)
        assert outcome == "decoded", name
        assert image.shape == (24, 32, 3) and image.dtype == np.uint8, name
    assert probe_image(tmp_path / "tiff-3-pages.tiff").frames == 3


def test_webp_is_taken_and_decodes_like_opencv_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "part.webp"
    path.write_bytes(encoded(".webp", picture(), (cv2.IMWRITE_WEBP_QUALITY, 101)))
    assert ".webp" in images.IMAGE_SUFFIXES
    assert is_image_name("part.webp") and is_image_name("PART.WEBP")
    assert probe_image(path).format == "WEBP"
    np.testing.assert_array_equal(read_image(path), cv2.imread(str(path)))
    np.testing.assert_array_equal(read_image(path), picture())  # lossless


def test_a_half_written_multi_page_tiff_scores_page_1_or_is_refused(tmp_path: Path) -> None:
    """The reported case: PIL's page count of a truncated multi-page TIFF raised TypeError
    ("Missing dimensions") or SyntaxError, which the camera does not catch."""
    for compression in (None, "tiff_lzw"):
        data = multi_page_tiff(3, compression)
        path = tmp_path / "pages.tiff"
        path.write_bytes(data)
        page_1 = read_image(path)
        np.testing.assert_array_equal(page_1, picture(seed=0))
        outcomes = Counter()
        for end in sorted({*range(0, len(data), 13), *range(len(data) - 64, len(data))}):
            path.write_bytes(data[:end])
            outcome, image = camera_path(path)  # raises if anything else escapes
            outcomes[outcome] += 1
            if image is not None:
                np.testing.assert_array_equal(image, page_1)
        assert outcomes["refused"] > 0 and outcomes["decoded"] > 0, outcomes
        print(f"\nhalf-written 3-page TIFF ({compression}): {dict(outcomes)}")


def test_decoder_fuzz_nothing_but_image_read_error_escapes(tmp_path: Path) -> None:
    started = time.monotonic()
    counts, escaped = run_fuzz(tmp_path)
    elapsed = time.monotonic() - started
    total = sum(sum(count.values()) for count in counts.values())
    print(f"\n{total} mutated files in {elapsed:.1f} s\n{report(counts)}")
    assert total >= MIN_CASES, f"only {total} cases within {BUDGET_S} s"
    assert set(counts) == set(seed_files())
    assert not escaped, f"{len(escaped)} of {total} escaped, e.g. {escaped[:5]}"


EXCEPTIONS = [
    TypeError("Missing dimensions"),
    SyntaxError("unknown pixel mode"),
    ValueError("buffer is not large enough"),
    struct.error("unpack requires a buffer of 4 bytes"),
    EOFError(),
    ZeroDivisionError("division by zero"),
    IndexError("list index out of range"),
    KeyError(42),
    MemoryError(),
    cv2.error("imdecode failed"),
]


@pytest.mark.parametrize("exception", EXCEPTIONS, ids=lambda e: type(e).__name__)
def test_any_exception_from_the_header_reader_is_the_files_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exception: Exception
) -> None:
    path = tmp_path / "part.png"
    path.write_bytes(encoded(".png", picture()))

    def raising(*args, **kwargs):
        raise exception

    monkeypatch.setattr(images.Image, "open", raising)
    with pytest.raises(ImageReadError) as refused:
        probe_image(path)
    message = str(refused.value)
    assert str(path) in message and type(exception).__name__ in message
    assert "\n" not in message


@pytest.mark.parametrize("exception", EXCEPTIONS, ids=lambda e: type(e).__name__)
def test_any_exception_from_the_pixel_decoder_is_the_files_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exception: Exception
) -> None:
    path = tmp_path / "part.png"
    path.write_bytes(encoded(".png", picture()))
    header = probe_image(path)

    def raising(*args, **kwargs):
        raise exception

    monkeypatch.setattr(images.cv2, "imdecode", raising)
    with pytest.raises(ImageReadError) as refused:
        read_image(path, MAX_PIXELS, header)
    message = str(refused.value)
    assert str(path) in message and "\n" not in message


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_interrupts_are_not_a_files_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interrupt: type[BaseException]
) -> None:
    path = tmp_path / "part.png"
    path.write_bytes(encoded(".png", picture()))
    header = probe_image(path)

    def raising(*args, **kwargs):
        raise interrupt

    with monkeypatch.context() as patch:
        patch.setattr(images.Image, "open", raising)
        with pytest.raises(interrupt):
            probe_image(path)
    monkeypatch.setattr(images.cv2, "imdecode", raising)
    with pytest.raises(interrupt):
        read_image(path, MAX_PIXELS, header)
