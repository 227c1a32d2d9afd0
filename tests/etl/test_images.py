"""etl.images on real files: the scikit-learn photos and the quirk corpus of tests/etl/corpus.py."""
from __future__ import annotations

import concurrent.futures
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from etl.images import EncodedImage, ImageLimits, ResizePolicy, decode, process_image
from etl.records import REASONS, Rejected
from tests.etl import corpus

REPO = Path(__file__).resolve().parents[2]
FIXED64 = ResizePolicy.parse("fixed:64")


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return corpus.sample_photos()


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory) -> tuple[Path, dict[str, str | None]]:
    directory = tmp_path_factory.mktemp("corpus")
    return directory, corpus.write_bad_corpus(directory)


def pixels(jpeg: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(jpeg)) as image:
        return np.asarray(image.convert("RGB")).astype(np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def jpeg_frame(jpeg: bytes) -> tuple[int, int]:
    """(SOF marker, component count) of a JPEG, walking its segments up to the first scan."""
    assert jpeg[:2] == b"\xff\xd8", "not a JPEG stream"
    pos = 2
    while pos < len(jpeg):
        assert jpeg[pos] == 0xFF, f"bad marker at {pos}"
        marker = jpeg[pos + 1]
        length = int.from_bytes(jpeg[pos + 2:pos + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker, jpeg[pos + 9]
        assert marker != 0xDA, "scan before any frame header"
        pos += 2 + length
    raise AssertionError("no frame header")


def assert_baseline_rgb(result: EncodedImage, size: tuple[int, int]) -> None:
    marker, components = jpeg_frame(result.jpeg)
    assert marker == 0xC0, f"expected a baseline JPEG (SOF0), got SOF{marker - 0xC0}"
    assert components == 3
    assert (result.width, result.height) == size
    with Image.open(io.BytesIO(result.jpeg)) as image:
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == size
        image.load()


# ---------------------------------------------------------------- the corpus, 100% classified


def test_every_corpus_file_is_classified_as_expected(bad_corpus):
    directory, expected = bad_corpus
    assert set(expected.values()) >= {None, "empty", "truncated", "not_an_image",
                                      "decompression_bomb", "decode_error", "too_large"}
    limits = ImageLimits(max_bytes=corpus.CORPUS_MAX_BYTES)
    got = {}
    for name in sorted(expected):
        try:
            result = process_image((directory / name).read_bytes(), FIXED64, 90, limits)
        except Rejected as rejected:
            assert rejected.reason in REASONS and rejected.detail, name
            got[name] = rejected.reason
        else:
            assert_baseline_rgb(result, (64, 64))
            got[name] = None
    assert got == expected


def test_byte_cap_is_checked_before_decoding():
    # Not an image at all, but over the cap: the cap decides without looking at the content.
    with pytest.raises(Rejected) as info:
        process_image(b"x" * 101, FIXED64, limits=ImageLimits(max_bytes=100))
    assert info.value.reason == "too_large"


def test_mutated_inputs_never_raise_anything_but_rejected(photos):
    """Bit flips and truncations of real files end as an image or a quarantine reason."""
    rng = np.random.default_rng(7)
    sources = [photos[0], corpus.png_photo(), corpus.palette_gif()]
    outcomes = set()
    for trial in range(36):
        data = bytearray(sources[trial % len(sources)])
        if trial % 2:
            data = data[: int(rng.integers(1, len(data)))]
        for pos in rng.integers(0, len(data), size=8):
            data[pos] ^= 1 << int(rng.integers(8))
        try:
            result = process_image(bytes(data), FIXED64)
            assert_baseline_rgb(result, (64, 64))
            outcomes.add("ok")
        except Rejected as rejected:
            outcomes.add(rejected.reason)
    assert "truncated" in outcomes and len(outcomes) >= 2


# ---------------------------------------------------------------- policies and sizes


@pytest.mark.parametrize("text", ["fixed:64", "center:224", "shorter:256", "fixed:1"])
def test_policy_text_round_trips(text):
    policy = ResizePolicy.parse(text)
    assert str(policy) == text and ResizePolicy.parse(str(policy)) == policy


@pytest.mark.parametrize("text", ["fixed", "fixed:", "fixed:0", "zoom:64", "fixed:-3", "fixed:64px",
                                  "center:99999", ""])
def test_bad_policy_text_names_the_flag(text):
    with pytest.raises(ValueError, match=r"^--resize:"):
        ResizePolicy.parse(text)


@pytest.mark.parametrize("policy,source,size", [
    ("fixed:64", (640, 427), (64, 64)),
    ("center:224", (640, 427), (224, 224)),
    ("shorter:256", (640, 427), (384, 256)),   # 640 * 256 / 427 = 383.7
    ("shorter:256", (375, 500), (256, 341)),   # portrait: 500 * 256 / 375 = 341.3
    ("shorter:64", (32, 32), (64, 64)),        # small inputs are scaled up
    ("center:64", (32, 48), (64, 64)),
    ("shorter:10", (1, 2000), (10, 20000)),
    ("shorter:3", (200, 1), (600, 3)),
])
def test_output_size_and_real_output(policy, source, size):
    parsed = ResizePolicy.parse(policy)
    assert parsed.output_size(*source) == size
    width, height = source
    array = np.asarray(Image.fromarray(corpus.photo_array(0)).resize(source))
    if size[0] * size[1] <= 1_000_000:  # keep the test quick; the pure sizes are checked above
        assert_baseline_rgb(process_image(array, parsed), size)


def test_real_photos_at_every_policy(photos):
    for data in photos:
        for text, size in [("fixed:64", (64, 64)), ("center:224", (224, 224)),
                           ("shorter:256", (384, 256))]:
            assert_baseline_rgb(process_image(data, ResizePolicy.parse(text)), size)


def test_center_crops_the_middle_and_fixed_squashes():
    # Three vertical stripes, red | green | blue, each 100 px wide and 100 px high.
    array = np.zeros((100, 300, 3), np.uint8)
    array[:, :100, 0] = array[:, 100:200, 1] = array[:, 200:, 2] = 255
    centre = pixels(process_image(array, ResizePolicy.parse("center:32"), 95).jpeg)
    assert np.abs(centre - (0, 255, 0)).max() < 40  # only the green middle survives
    squashed = pixels(process_image(array, ResizePolicy.parse("fixed:30"), 95).jpeg)
    for column, colour in [(4, (255, 0, 0)), (15, (0, 255, 0)), (25, (0, 0, 255))]:
        assert np.abs(squashed[:, column] - colour).max() < 60, column


def test_pixel_arrays_as_cifar_gives_them():
    rgb = corpus.photo_array(0, (32, 32))
    assert_baseline_rgb(process_image(rgb, FIXED64), (64, 64))
    gray = rgb[..., 0].copy()
    out = pixels(process_image(gray, FIXED64).jpeg)
    assert np.abs(out[..., 0] - out[..., 2]).max() <= 2  # grey stays grey in 3 channels
    assert_baseline_rgb(process_image(gray[..., None], FIXED64), (64, 64))
    for bad in (rgb.astype(np.float32), np.zeros((4, 4, 4), np.uint8), np.zeros((0, 4), np.uint8)):
        with pytest.raises(Rejected) as info:
            process_image(bad, FIXED64)
        assert info.value.reason == "decode_error"
    with pytest.raises(Rejected) as info:
        process_image(np.zeros((20, 20), np.uint8), FIXED64, limits=ImageLimits(max_pixels=399))
    assert info.value.reason == "decompression_bomb"


def test_quality_flag():
    data = corpus.sample_photos()[0]
    low, high = (len(process_image(data, FIXED64, q).jpeg) for q in (30, 95))
    assert low < high
    with pytest.raises(ValueError, match="--quality"):
        process_image(data, FIXED64, 0)


# ---------------------------------------------------------------- colour conversions


def test_16bit_grey_is_rescaled_not_clipped():
    out = pixels(process_image(corpus.gray16_png(), ResizePolicy.parse("fixed:48"), 95).jpeg)
    left, right = (round(v / 257) for v in corpus.GRAY16_LEVELS)  # 156, 39; clipping gives 255
    assert np.abs(out[8:24, 4:18] - left).max() <= 3
    assert np.abs(out[8:24, 30:44] - right).max() <= 3


def test_16bit_rgb_colour():
    out = pixels(process_image(corpus.rgb16_png(), FIXED64, 95).jpeg)
    expected = [v / 257 for v in corpus.RGB16_COLOUR]
    assert np.abs(out[16:48, 16:48] - expected).max() <= 4


def test_cmyk_jpeg_comes_out_in_the_right_colours():
    red = pixels(process_image(corpus.cmyk_jpeg(), FIXED64, 95).jpeg)
    assert np.abs(red[16:48, 16:48] - (255, 0, 0)).max() <= 6
    # A CMYK photo converts to (nearly) the same picture as its RGB original.
    original = corpus.photo_array(1, (160, 107))
    from_cmyk = pixels(process_image(corpus.cmyk_photo_jpeg(), FIXED64).jpeg)
    from_rgb = pixels(process_image(original, FIXED64).jpeg)
    assert psnr(from_cmyk, from_rgb) > 28


def test_transparency_is_composited_on_white():
    out = pixels(process_image(corpus.palette_png(), ResizePolicy.parse("fixed:48"), 95).jpeg)
    assert np.abs(out[8:24, 4:18] - 255).max() <= 4                     # transparent -> white
    assert np.abs(out[8:24, 30:44] - corpus.PALETTE_BLUE).max() <= 8     # opaque blue stays
    half = pixels(process_image(corpus.rgba_png(), FIXED64, 95).jpeg)
    assert np.abs(half[16:48, 16:48] - (255, 127, 127)).max() <= 5


def test_grayscale_jpeg_becomes_three_equal_channels():
    result = process_image(corpus.gray_jpeg(), FIXED64, 95)
    assert_baseline_rgb(result, (64, 64))
    out = pixels(result.jpeg)
    assert np.abs(out[..., 0] - out[..., 1]).max() <= 2 and out.std() > 10


def test_exif_orientation_is_not_applied():
    # Stored 96x64 with orientation 6 (displays 64x96): we keep the stored layout, as the
    # reference converter and tf.image.decode_jpeg do.
    result = process_image(corpus.exif_rotated_jpeg(), ResizePolicy.parse("shorter:32"))
    assert (result.width, result.height) == (48, 32)


# ---------------------------------------------------------------- draft mode (DCT scaling)


@pytest.mark.parametrize("policy,scale,decoded", [
    ("fixed:64", 4, (160, 107)),      # min(640 // 64, 427 // 64) = 6 -> 1/4
    ("center:100", 4, (160, 107)),    # shorter side 427 -> 100: 1/4 still >= 100
    ("shorter:200", 2, (320, 214)),
    ("center:224", 1, (640, 427)),    # less than 2x smaller: full decode
    ("fixed:320", 1, (640, 427)),     # 427 // 320 = 1: one side is not 2x smaller
])
def test_draft_mode_is_used_when_the_target_is_2x_smaller(photos, policy, scale, decoded):
    parsed = ResizePolicy.parse(policy)
    result = decode(photos[0], parsed)
    assert result.scale == scale and result.image.size == decoded
    needed = parsed.draft_size(640, 427)
    assert result.image.width >= needed[0] and result.image.height >= needed[1]
    assert decode(photos[0]).image.size == (640, 427)  # no policy: full size


@pytest.mark.parametrize("policy", ["fixed:64", "center:100", "shorter:150"])
def test_draft_output_matches_a_full_decode(photos, policy):
    parsed = ResizePolicy.parse(policy)
    for data in photos:
        ours = process_image(data, parsed, 95)
        with Image.open(io.BytesIO(data)) as full:
            reference = full.convert("RGB").resize(
                (ours.width, ours.height), Image.Resampling.LANCZOS,
                box=parsed.source_box(*full.size))
        assert psnr(pixels(ours.jpeg), np.asarray(reference)) > 30


# ---------------------------------------------------------------- bombs, safety, threads


def test_own_pixel_limit_is_checked_from_the_header(photos):
    with pytest.raises(Rejected) as info:
        process_image(photos[0], FIXED64, limits=ImageLimits(max_pixels=640 * 427 - 1))
    assert info.value.reason == "decompression_bomb" and "640x427" in info.value.detail
    assert process_image(photos[0], FIXED64, limits=ImageLimits(max_pixels=640 * 427)).width == 64


def test_decompression_bomb_rejected_without_allocating():
    """In a child whose address space has only ~200 MB to spare (so a real decode of the
    claimed pixels would fail with MemoryError), both bomb headers are rejected as bombs."""
    script = textwrap.dedent("""
        import json, resource
        from PIL import Image
        from etl.images import ImageLimits, ResizePolicy, process_image
        from etl.records import Rejected
        from tests.etl.corpus import bomb_png

        def vm_bytes():
            for line in open("/proc/self/status"):
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
        limit = vm_bytes() + 200 * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        out = {}
        try:  # control: the limit really stops a 300 MB image
            Image.new("RGB", (20000, 5000))
            out["control"] = "allocated"
        except MemoryError:
            out["control"] = "MemoryError"
        cases = {"pillow_limit": (bomb_png(30000, 30000), ImageLimits()),
                 "own_limit": (bomb_png(20000, 5000), ImageLimits(max_pixels=50_000_000))}
        for name, (data, limits) in cases.items():
            try:
                process_image(data, ResizePolicy.parse("fixed:64"), limits=limits)
                out[name] = "accepted"
            except Rejected as err:
                out[name] = err.reason
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", script], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
        "control": "MemoryError", "pillow_limit": "decompression_bomb",
        "own_limit": "decompression_bomb"}
    assert len(corpus.bomb_png()) < 200  # the file itself is tiny


def test_threads_give_identical_results_and_globals_are_untouched(bad_corpus):
    directory, expected = bad_corpus
    limits = ImageLimits(max_bytes=corpus.CORPUS_MAX_BYTES)
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)

    def run(name: str):
        try:
            return process_image((directory / name).read_bytes(), FIXED64, 90, limits).jpeg
        except Rejected as rejected:
            return rejected.reason

    names = sorted(expected) * 3
    sequential = [run(name) for name in names]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(run, names))
    assert threaded == sequential
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before


def test_only_safe_formats_are_opened():
    # An EPS file would make Pillow run Ghostscript on untrusted input; it is not an image to us.
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(Rejected) as info:
        process_image(eps, FIXED64)
    assert info.value.reason == "not_an_image"
    with pytest.raises(Rejected) as info:
        process_image("not bytes", FIXED64)  # type: ignore[arg-type]
    assert info.value.reason == "error"


# ---------------------------------------------------------------- the corpus builders themselves


def test_corpus_builders_are_seeded_and_checked(tmp_path):
    first, again, other = (list(corpus.photo_variants(3, seed)) for seed in (1, 1, 2))
    assert first == again and first != other
    with Image.open(io.BytesIO(first[0])) as image:
        assert image.format == "JPEG" and image.size == (500, 375)
    with pytest.raises(ValueError, match="max_bytes"):
        corpus.write_bad_corpus(tmp_path, max_bytes=50_000)  # the photos do not fit under it
