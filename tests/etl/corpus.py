"""Real image files for ETL tests: the two camera photos scikit-learn ships, and quirk files built
with Pillow (or, where Pillow cannot write the quirk, byte by byte).

Other ETL tests import this (`from tests.etl.corpus import ...`), so it needs only Pillow and
NumPy; scikit-learn is located on disk, never imported (it is slow to import).
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from etl.samples import photo_variants, sample_photos  # noqa: F401  (re-exported for the tests)

# Byte cap a job over the bad corpus should use: every file but the oversized one fits under it.
CORPUS_MAX_BYTES = 300_000

# Known colours the quirk files carry; tests check the converted pixels against these.
CMYK_RED = (0, 255, 255, 0)          # pure red in CMYK
GRAY16_LEVELS = (40000, 10000)       # left / right half of the 16-bit grey PNG
RGB16_COLOUR = (40000, 10000, 60000)  # every pixel of the 16-bit RGB PNG
PALETTE_BLUE = (0, 0, 255)           # opaque half of the palette PNG; the other half is transparent
RGBA_HALF_RED = (255, 0, 0, 128)     # half-transparent red (composited on white: ~(255, 127, 127))


def photo_array(index: int = 0, size: tuple[int, int] | None = None) -> np.ndarray:
    """One sample photo as an HxWx3 uint8 array, optionally resized to (w, h)."""
    with Image.open(io.BytesIO(sample_photos()[index])) as image:
        image = image.convert("RGB")
        if size is not None:
            image = image.resize(size, Image.Resampling.LANCZOS)
        return np.asarray(image)


def _save(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header claims width x height RGB pixels (a decompression-bomb header)."""
    return _png(width, height, 8, 2, zlib.compress(b"\x00" * 64))


def rgb16_png(colour: tuple[int, int, int] = RGB16_COLOUR, size: tuple[int, int] = (48, 32)) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one, so the bytes are built here)."""
    width, height = size
    row = b"\x00" + struct.pack(">HHH", *colour) * width  # filter byte 0 (None), big-endian
    return _png(width, height, 16, 2, zlib.compress(row * height))


def gray16_png(levels: tuple[int, int] = GRAY16_LEVELS, size: tuple[int, int] = (48, 32)) -> bytes:
    """A 16-bit greyscale PNG (Pillow mode I;16): left half levels[0], right half levels[1]."""
    width, height = size
    array = np.empty((height, width), dtype=np.uint16)
    array[:, : width // 2], array[:, width // 2:] = levels
    return _save(Image.fromarray(array), "PNG")


def cmyk_jpeg(colour: tuple[int, int, int, int] = CMYK_RED, size: tuple[int, int] = (48, 32)) -> bytes:
    """A CMYK JPEG; Pillow writes it Adobe-style (inverted, with an APP14 Adobe marker)."""
    return _save(Image.new("CMYK", size, colour), "JPEG", quality=95)


def cmyk_photo_jpeg() -> bytes:
    return _save(Image.fromarray(photo_array(1, (160, 107))).convert("CMYK"), "JPEG", quality=90)


def gray_jpeg() -> bytes:
    return _save(Image.fromarray(photo_array(0, (200, 133))).convert("L"), "JPEG", quality=90)


def palette_png(size: tuple[int, int] = (48, 32)) -> bytes:
    """Palette PNG: left half transparent (palette index 0, stored black), right half blue."""
    width, height = size
    indices = np.zeros((height, width), dtype=np.uint8)
    indices[:, width // 2:] = 1
    image = Image.fromarray(indices, "P")
    image.putpalette([0, 0, 0, *PALETTE_BLUE] + [0, 0, 0] * 254)
    return _save(image, "PNG", transparency=0)


def rgba_png(colour: tuple[int, int, int, int] = RGBA_HALF_RED, size: tuple[int, int] = (48, 32)) -> bytes:
    return _save(Image.new("RGBA", size, colour), "PNG")


def palette_gif() -> bytes:
    """A photo quantised to a 256-colour GIF."""
    return _save(Image.fromarray(photo_array(1, (120, 80))).quantize(256), "GIF")


def png_photo() -> bytes:
    return _save(Image.fromarray(photo_array(0, (240, 160))), "PNG")


def exif_rotated_jpeg() -> bytes:
    """A 96x64 JPEG tagged with EXIF orientation 6 (rotate 90 degrees) to display as 64x96."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(Image.fromarray(photo_array(0, (96, 64))), "JPEG", quality=90, exif=exif.tobytes())


def corrupt_png() -> bytes:
    """A valid PNG header followed by deflate data that does not inflate (a decode error)."""
    good = png_photo()
    start = good.index(b"IDAT") + 4
    return good[:start + 2] + bytes(200) + good[start + 202:]


def oversized_bmp(max_bytes: int) -> bytes:
    """A valid uncompressed BMP photo just over `max_bytes`."""
    width = 256  # 768-byte rows: no BMP row padding
    height = max_bytes // (width * 3) + 1
    return _save(Image.fromarray(photo_array(1, (width, height))), "BMP")


def write_bad_corpus(directory: Path, max_bytes: int = CORPUS_MAX_BYTES,
                     synset: str = "n00000001") -> dict[str, str | None]:
    """Write the quirk corpus into `directory` (ImageNet-style names `<synset>_<i>.JPEG`).

    Returns file name -> expected quarantine reason, or None for files that must convert to an
    RGB JPEG. The job processing it must use `max_bytes` as its byte cap.
    """
    china, flower = sample_photos()
    entries: list[tuple[bytes, str | None]] = [
        (china, None),
        (flower, None),
        (b"", "empty"),
        (china[: len(china) // 2], "truncated"),
        (b"This is not a JPEG, just text with the wrong name.\n" * 4, "not_an_image"),
        (png_photo(), None),                 # PNG named .JPEG
        (cmyk_jpeg(), None),
        (cmyk_photo_jpeg(), None),
        (gray_jpeg(), None),
        (gray16_png(), None),
        (rgb16_png(), None),
        (palette_png(), None),
        (rgba_png(), None),
        (palette_gif(), None),               # GIF named .JPEG
        (exif_rotated_jpeg(), None),
        (bomb_png(), "decompression_bomb"),  # header claims 30000x30000
        (corrupt_png(), "decode_error"),
        (oversized_bmp(max_bytes), "too_large"),
    ]
    for data, reason in entries:
        if reason != "too_large" and len(data) > max_bytes:
            raise ValueError(f"max_bytes={max_bytes} is too small for the corpus: a "
                             f"{len(data)}-byte file must fit under it")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str | None] = {}
    for number, (data, reason) in enumerate(entries, start=1):
        name = f"{synset}_{number}.JPEG"
        (directory / name).write_bytes(data)
        expected[name] = reason
    return expected
