"""etl.lanczos: Pillow's Lanczos by matrices, exact in float32, on real photos and a zone plate."""
from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest
from PIL import Image

from etl import lanczos
from etl.images import REDUCING_GAP, ResizePolicy, decode
from etl.samples import zone_plate, zone_plate_values
from tests.etl import corpus

LANCZOS = Image.Resampling.LANCZOS


def both(image: Image.Image, size, box) -> tuple[np.ndarray, np.ndarray]:
    ours = lanczos.resize(image, size, box)
    assert ours.mode == "RGB" and ours.size == tuple(size)
    return (np.asarray(ours).astype(np.int64),
            np.asarray(image.resize(size, LANCZOS, box=box)).astype(np.int64))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2.0))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@pytest.mark.parametrize("policy", ["center:224", "center:160", "shorter:150", "fixed:64"])
def test_real_photos_match_pillow(policy):
    parsed = ResizePolicy.parse(policy)
    for data in corpus.sample_photos():
        decoded = decode(data, parsed)
        width, height = decoded.source_size
        size = parsed.output_size(width, height)
        box = tuple(v / decoded.scale for v in parsed.source_box(width, height))
        assert lanczos.suits(decoded.image, size, box, REDUCING_GAP)
        ours, pillow = both(decoded.image, size, box)
        # Only overshoots at hard edges, clipped by Pillow between its passes, differ visibly.
        assert np.abs(ours - pillow).mean() < 0.3 and psnr(ours, pillow) > 50, policy


@pytest.mark.parametrize("source,size,box", [
    ((32, 48), (64, 64), (0, 0, 32, 48)),          # upscaling: the kernel is not widened
    ((101, 77), (33, 19), (0, 0, 101, 77)),        # odd sizes
    ((120, 80), (1, 1), (0, 0, 120, 80)),          # a single pixel
    ((300, 200), (57, 57), (12.25, 3.5, 290.75, 199.0)),  # fractional box near the borders
    ((64, 300), (64, 90), (0, 0, 64, 300)),        # one axis untouched
])
def test_geometry_matches_pillow(source, size, box):
    image = Image.fromarray(corpus.photo_array(1, source))
    ours, pillow = both(image, size, box)
    assert np.abs(ours - pillow).max() <= 16 and np.abs(ours - pillow).mean() < 0.6


def test_sums_are_exact_whatever_the_summation_order():
    """The same weights summed in float64 in another order give the very same bytes: float32
    sums of 15-bit weights times 8-bit pixels are exact, so no BLAS kernel can change a bit."""
    image = Image.fromarray(corpus.photo_array(0))  # 640x427
    size, box = (224, 224), (106.5, 0.0, 533.5, 427.0)
    ours = np.asarray(lanczos.resize(image, size, box))

    def dense(in_size, in0, in1, out_size):
        first, last, _, blocks = lanczos._pass(in_size, in0, in1, out_size)
        matrix = np.zeros((out_size, last - first))
        for o0, o1, i0, i1, block in blocks:
            matrix[o0:o1, i0:i1] = block
        return first, last, matrix

    x0, x1, cols = dense(image.width, box[0], box[2], size[0])
    y0, y1, rows = dense(image.height, box[1], box[3], size[1])
    pixels = np.asarray(image, np.float64)[y0:y1, x0:x1][::-1]  # reversed: another order
    tall = np.rint(np.einsum("oh,hwc->owc", rows[:, ::-1], pixels))
    out = np.einsum("pw,owc->opc", cols[:, ::-1], tall[:, ::-1])
    expected = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    assert np.array_equal(ours, expected)


@pytest.mark.parametrize("source", [375, 640])
def test_zone_plate_no_more_aliasing_and_no_more_blur_than_pillow(source):
    out = 224
    image = Image.fromarray(zone_plate(source))
    ours, pillow = both(image, (out, out), (0.0, 0.0, float(source), float(source)))
    rate = 0.5 / (source / 2)
    coords = (np.arange(out) + 0.5) * source / out - source / 2
    freq = rate * np.hypot(coords[None, :], coords[:, None]) * source / out
    stop, passband = freq > 0.65, freq < 0.25
    ideal = zone_plate_values(source, out, rate)

    def rms(values):
        return float(np.sqrt(np.mean(values ** 2)))

    alias = [rms(grey[..., 0][stop] - 127.5) for grey in (ours, pillow)]
    blur = [rms(grey[..., 0][passband] - ideal[passband]) for grey in (ours, pillow)]
    assert alias[0] <= 1.05 * alias[1]
    assert blur[0] <= 1.05 * blur[1]
    # The pattern does alias without a filter: the measure can tell.
    nearest = np.asarray(image.resize((out, out), Image.Resampling.NEAREST))[..., 0]
    assert rms(nearest[stop] - 127.5) > 5 * alias[1]


def test_falls_back_to_pillow_where_pillow_reduces_first_or_the_input_is_huge():
    rgb = Image.new("RGB", (1200, 900))
    assert lanczos.suits(rgb, (224, 224), (0, 0, 1200, 900), REDUCING_GAP)       # 5.4x
    assert not lanczos.suits(rgb, (150, 150), (0, 0, 1200, 900), REDUCING_GAP)   # 8x: reduce()
    assert not lanczos.suits(Image.new("L", (300, 200)), (64, 64), (0, 0, 300, 200), REDUCING_GAP)
    side = int(lanczos.MAX_INPUT_PIXELS ** 0.5) + 1  # only the box's size matters here
    assert not lanczos.suits(rgb, (side // 2, side // 2), (0, 0, side, side), REDUCING_GAP)


def test_threads_and_changing_sizes_give_identical_results():
    """Work arrays are per thread and per shape: interleaved sizes and threads cannot mix."""
    jobs = [(corpus.photo_array(i % 2, (200 + 37 * (i % 3), 150 + 11 * (i % 4))), 40 + 9 * (i % 5))
            for i in range(24)]

    def run(job):
        array, n = job
        image = Image.fromarray(array)
        return np.asarray(lanczos.resize(image, (n, n), (0, 0, *image.size))).tobytes()

    sequential = [run(job) for job in jobs]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert list(pool.map(run, jobs)) == sequential
