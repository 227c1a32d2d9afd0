"""Decode, convert to RGB, resize and re-encode one image: pure functions, no Spark, no TensorFlow.

`process_image` is what the Spark job calls per input. It either returns a baseline 3-channel RGB
JPEG or raises `etl.records.Rejected` with a quarantine reason; no other exception escapes for bad
input. Nothing here changes Pillow's global state (LOAD_TRUNCATED_IMAGES, MAX_IMAGE_PIXELS), so
the functions are safe to call from many threads at once.

Choices worth knowing:
- EXIF orientation is NOT applied. The reference ImageNet converter and `tf.image.decode_jpeg` both
  ignore it, so pixels stay exactly where every existing ImageNet reader expects them.
- Colour profiles (ICC) are dropped and CMYK is converted with Pillow's plain formula, as the
  reference converter does; Adobe's inverted CMYK JPEGs are undone by Pillow's JPEG reader.
- Transparent inputs are composited on white (dropping alpha would expose whatever colour the
  transparent pixels happen to hold, often black).
- 16-bit inputs are rescaled to 8 bit (x / 257, rounded), never clipped at 255.
- Only common raster formats are opened (`FORMATS`): no EPS (Pillow would run Ghostscript on an
  untrusted file) and no header-less formats that could claim arbitrary bytes.
"""
from __future__ import annotations

import dataclasses
import io
import re

import numpy as np
from PIL import Image, UnidentifiedImageError

from etl import lanczos
from etl.records import Rejected

# Formats we accept by content (the file name's extension is never trusted). Multi-picture JPEGs
# (MPO, common from cameras) come in through the JPEG opener.
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")

# Leading bytes of the formats above: a recognised signature that Pillow cannot open is a broken
# image (decode_error), anything else is not an image at all.
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)

# Resampling: Lanczos, with Pillow's `reduce()` first when the scale factor exceeds this gap;
# 3.0 is indistinguishable from a full Lanczos pass and much faster on big non-JPEG inputs.
# Below the gap (every JPEG after DCT scaling) etl.lanczos does the same filter by matrices.
RESAMPLE = Image.Resampling.LANCZOS
REDUCING_GAP = 3.0

MAX_SIZE = 16384  # largest N accepted in a resize policy
WHITE = (255, 255, 255)

_POLICY_RE = re.compile(r"^(fixed|center|shorter):([0-9]+)$")


@dataclasses.dataclass(frozen=True)
class ResizePolicy:
    """How every image is sized: `fixed:N` squashes to NxN (as the reference project did),
    `center:N` scales the shorter side to N and centre-crops NxN, `shorter:N` scales the shorter
    side to N keeping the aspect ratio."""

    kind: str
    size: int

    KINDS = ("fixed", "center", "shorter")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise ValueError(f"--resize: unknown policy {self.kind!r}; use one of "
                             f"{', '.join(k + ':N' for k in self.KINDS)}")
        if not isinstance(self.size, int) or not 1 <= self.size <= MAX_SIZE:
            raise ValueError(f"--resize: size must be an integer in 1..{MAX_SIZE}, got {self.size!r}")

    @classmethod
    def parse(cls, text: str) -> "ResizePolicy":
        match = _POLICY_RE.match(text.strip()) if isinstance(text, str) else None
        if not match:
            raise ValueError(f"--resize: expected fixed:N, center:N or shorter:N, got {text!r}")
        return cls(match.group(1), int(match.group(2)))

    def __str__(self) -> str:
        return f"{self.kind}:{self.size}"

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the result for a source of the given size."""
        if width < 1 or height < 1:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        n = self.size
        if self.kind in ("fixed", "center"):
            return n, n
        # shorter: round half up (not Python's banker's rounding) so sizes never depend on parity.
        if width <= height:
            return n, max(1, int(height * n / width + 0.5))
        return max(1, int(width * n / height + 0.5)), n

    def source_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The region of the source that ends up in the output (the centre square for `center`)."""
        if self.kind != "center":
            return 0.0, 0.0, float(width), float(height)
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        return left, top, left + side, top + side

    def draft_size(self, width: int, height: int) -> tuple[int, int]:
        """The smallest size the decoder may hand us: the output before any crop."""
        if self.kind == "fixed":
            return self.size, self.size
        return ResizePolicy("shorter", self.size).output_size(width, height)


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 32 * 1024 * 1024   # encoded size, checked before decoding
    max_pixels: int = 178_956_970       # header width x height (Pillow's own bomb limit)


@dataclasses.dataclass(frozen=True)
class EncodedImage:
    jpeg: bytes
    height: int
    width: int


@dataclasses.dataclass
class Decoded:
    """A decoded RGB image and how it relates to the source it came from."""

    image: Image.Image
    source_size: tuple[int, int]  # (w, h) as stored in the input
    scale: int                    # JPEG DCT scaling used by the decoder (1 = full size)
    format: str


def _sniff(payload: bytes) -> str | None:
    for magic, fmt in _SIGNATURES:
        if payload.startswith(magic):
            return fmt
    if payload[:4] == b"RIFF" and payload[8:12] == b"WEBP":
        return "WEBP"
    return None


def _check_pixels(width: int, height: int, limits: ImageLimits) -> None:
    if width * height > limits.max_pixels:
        raise Rejected("decompression_bomb",
                       f"header claims {width}x{height} = {width * height} pixels, "
                       f"limit {limits.max_pixels}")


def _rescale_16bit(image: Image.Image) -> Image.Image:
    """16-bit (or 32-bit integer holding 16-bit) grey -> 8-bit L, rounding x / 257."""
    # Pillow opens some 16-bit sources (PGM, some TIFFs) as 32-bit "I": clamp to the 16-bit range.
    values = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
    return Image.fromarray(((values + 128) // 257).astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 3-channel RGB (alpha composited on white, 16 bit rescaled)."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        return _rescale_16bit(image).convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _from_array(payload: np.ndarray, limits: ImageLimits) -> Decoded:
    if payload.dtype != np.uint8:
        raise Rejected("decode_error", f"pixel array must be uint8, got {payload.dtype}")
    array = payload[..., 0] if payload.ndim == 3 and payload.shape[2] == 1 else payload
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)) or 0 in array.shape:
        raise Rejected("decode_error",
                       f"pixel array must be HxW or HxWx3, got shape {tuple(payload.shape)}")
    height, width = array.shape[:2]
    _check_pixels(width, height, limits)
    image = Image.fromarray(np.ascontiguousarray(array), "L" if array.ndim == 2 else "RGB")
    return Decoded(to_rgb(image), (width, height), 1, "array")


def _open(payload: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(payload), formats=FORMATS)
    except Image.DecompressionBombError as err:
        raise Rejected("decompression_bomb", str(err)) from None
    except UnidentifiedImageError:
        fmt = _sniff(payload)
        if fmt is None:
            raise Rejected("not_an_image", f"no known image format in the first bytes "
                                           f"{payload[:8]!r}") from None
        raise Rejected("decode_error", f"{fmt} signature but unreadable header") from None
    except Exception as err:  # e.g. a header cut short: "Truncated File Read"
        raise _classify(err) from None


def _classify(err: Exception) -> Rejected:
    text = str(err) or type(err).__name__
    if isinstance(err, EOFError) or "truncated" in text.lower() or "premature end" in text.lower():
        return Rejected("truncated", text)
    return Rejected("decode_error", f"{type(err).__name__}: {text}")


def decode(payload: bytes | np.ndarray, policy: ResizePolicy | None = None,
           limits: ImageLimits = ImageLimits()) -> Decoded:
    """Decode to RGB. With a `policy`, a JPEG decoder may scale down by 2, 4 or 8 (DCT scaling,
    Pillow's draft mode) when the policy's pre-crop size is at least 2x smaller in both
    directions; the decoded image is never smaller than that size.
    """
    if isinstance(payload, np.ndarray):
        return _from_array(payload, limits)
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise Rejected("error", f"payload must be bytes or a uint8 array, got {type(payload).__name__}")
    size = memoryview(payload).nbytes
    if size == 0:
        raise Rejected("empty", "0 bytes")
    if size > limits.max_bytes:  # before copying or decoding anything
        raise Rejected("too_large", f"{size} bytes, limit {limits.max_bytes}")
    payload = bytes(payload)
    image = _open(payload)
    try:
        # Header only so far: no pixel has been allocated yet.
        width, height = image.size
        _check_pixels(width, height, limits)
        scale = 1
        if policy is not None and image.format in ("JPEG", "MPO"):
            drafted = image.draft(None, policy.draft_size(width, height))
            if drafted is not None:  # None: a layout Pillow cannot draft
                scale = round(width / drafted[1][2])
        image.load()
        return Decoded(to_rgb(image), (width, height), scale, image.format or "")
    except Rejected:
        raise
    except Exception as err:  # any decoder failure is this input's problem, not the job's
        raise _classify(err) from None


def resize(decoded: Decoded, policy: ResizePolicy) -> Image.Image:
    """Apply the policy; geometry is computed on the source size so DCT scaling never shifts it."""
    width, height = decoded.source_size
    size = policy.output_size(width, height)
    box = tuple(v / decoded.scale for v in policy.source_box(width, height))
    if size == decoded.image.size and box == (0, 0, *decoded.image.size):
        return decoded.image
    if lanczos.suits(decoded.image, size, box, REDUCING_GAP):
        return lanczos.resize(decoded.image, size, box)
    return decoded.image.resize(size, RESAMPLE, box=box, reducing_gap=REDUCING_GAP)


def encode(image: Image.Image, quality: int = 90) -> bytes:
    """Baseline (not progressive) RGB JPEG without ICC profile or EXIF."""
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality: must be in 1..100, got {quality}")
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality, progressive=False, optimize=False)
    return out.getvalue()


def process_image(payload: bytes | np.ndarray, policy: ResizePolicy, quality: int = 90,
                  limits: ImageLimits = ImageLimits()) -> EncodedImage:
    """One input -> an RGB JPEG of the policy's size, or `Rejected` with a quarantine reason."""
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality: must be in 1..100, got {quality}")
    decoded = decode(payload, policy, limits)
    try:
        result = resize(decoded, policy)
    except Exception as err:  # never crash the job on one input
        raise _classify(err) from None
    return EncodedImage(jpeg=encode(result, quality), height=result.height, width=result.width)
