"""Resampling quality: etl.lanczos (the ETL's matrix Lanczos) against Pillow's Lanczos, both
measured against a high-quality reference, on real photos and on a zone plate.

  photos      the two scikit-learn camera photos and seeded ImageNet-like crops of them, at the
              ETL's center:224, center:160 and fixed:64 geometry (after the same DCT-scaled
              decode the ETL does). Reference: a float64 windowed sinc with 8 lobes (Lanczos-8,
              much closer to the ideal low-pass than either Lanczos-3), one rounding at the end.
              PSNR and SSIM (luma, 7x7 window) of each route against it, and of one route against
              the other.
  zone plate  rings from 0 to the source's Nyquist frequency, shrunk 375 -> 224 (center:224 on a
              500x375 photo) and 640 -> 224: in the stopband (frequencies above 1.3x the output's
              Nyquist, which must vanish) the RMS of what is left is aliasing; in the passband
              (below 0.5x) the RMS error against the analytically sampled rings measures
              sharpness (blur shows as lost amplitude).

Targets (PASS/FAIL rows): PSNR to the reference no more than 0.1 dB below Pillow's; SSIM no more
than 0.001 below; zone plate aliasing and passband error at most 5% above Pillow's.

Usage: python bench/resample_quality.py [--variants N] [--out FILE]
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from common.atomic import write_json  # noqa: E402
from etl import lanczos  # noqa: E402
from etl.images import ResizePolicy, decode  # noqa: E402
from etl.samples import photo_variants, sample_photos, zone_plate, zone_plate_values  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results" / "resample_quality.json"
REFERENCE_LOBES = 8
POLICIES = ("center:224", "center:160", "fixed:64")


def _reference_matrix(in_size: int, in0: float, in1: float, out_size: int) -> np.ndarray:
    """Dense float64 weights of a Lanczos-`REFERENCE_LOBES` pass with Pillow's pixel centres."""
    scale = (in1 - in0) / out_size
    filterscale = max(scale, 1.0)
    centre = in0 + (np.arange(out_size) + 0.5) * scale
    x = np.arange(in_size) + 0.5
    t = (x[None, :] - centre[:, None]) / filterscale
    w = np.where(np.abs(t) < REFERENCE_LOBES, np.sinc(t) * np.sinc(t / REFERENCE_LOBES), 0.0)
    return w / w.sum(axis=1, keepdims=True)


def reference_resize(image: Image.Image, size: tuple[int, int], box) -> np.ndarray:
    """float64 Lanczos-8, no intermediate rounding: the quality both routes are held to."""
    pixels = np.asarray(image.convert("RGB"), np.float64)
    rows = _reference_matrix(image.height, box[1], box[3], size[1])
    cols = _reference_matrix(image.width, box[0], box[2], size[0])
    out = np.einsum("oh,hwc->owc", rows, pixels)
    out = np.einsum("pw,owc->opc", cols, out)
    return np.clip(np.rint(out), 0, 255)


def luma(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def _box_mean(x: np.ndarray, k: int = 7) -> np.ndarray:
    c = np.cumsum(np.cumsum(np.pad(x, ((1, 0), (1, 0))), axis=0), axis=1)
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of the luma with a 7x7 uniform window (Wang et al. constants)."""
    x, y = luma(a), luma(b)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = _box_mean(x), _box_mean(y)
    vx, vy = _box_mean(x * x) - mx * mx, _box_mean(y * y) - my * my
    cov = _box_mean(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def _geometry(data: bytes, policy: ResizePolicy):
    """The decoded image and the (size, box) the ETL resizes it with (etl.images.resize)."""
    decoded = decode(data, policy)
    width, height = decoded.source_size
    box = tuple(v / decoded.scale for v in policy.source_box(width, height))
    return decoded.image, policy.output_size(width, height), box


def photo_rows(variants: int) -> list[dict]:
    inputs = [("china.jpg", sample_photos()[0]), ("flower.jpg", sample_photos()[1])]
    inputs += [(f"variant {i}", d) for i, d in enumerate(photo_variants(variants, seed=3))]
    rows = []
    for text in POLICIES:
        policy = ResizePolicy.parse(text)
        sums = {k: 0.0 for k in ("psnr_pillow", "psnr_ours", "ssim_pillow", "ssim_ours",
                                 "psnr_ours_vs_pillow")}
        worst = 0
        for _, data in inputs:
            image, size, box = _geometry(data, policy)
            pillow = np.asarray(image.resize(size, Image.Resampling.LANCZOS, box=box))
            ours = np.asarray(lanczos.resize(image, size, box))
            reference = reference_resize(image, size, box)
            sums["psnr_pillow"] += psnr(pillow, reference)
            sums["psnr_ours"] += psnr(ours, reference)
            sums["ssim_pillow"] += ssim(pillow, reference)
            sums["ssim_ours"] += ssim(ours, reference)
            sums["psnr_ours_vs_pillow"] += psnr(ours, pillow)
            worst = max(worst, int(np.abs(ours.astype(int) - pillow).max()))
        row = {"case": f"photos {text}", "images": len(inputs)}
        row.update({k: round(v / len(inputs), 4) for k, v in sums.items()})
        row["max_abs_ours_vs_pillow"] = worst
        rows.append(row)
    return rows


def zone_rows() -> list[dict]:
    rows = []
    for source, out in ((375, 224), (640, 224)):
        image = Image.fromarray(zone_plate(source))
        box = (0.0, 0.0, float(source), float(source))
        routes = {"pillow": np.asarray(image.resize((out, out), Image.Resampling.LANCZOS)),
                  "ours": np.asarray(lanczos.resize(image, (out, out), box))}
        # Local frequency at an output pixel, in cycles per output pixel (Nyquist = 0.5).
        rate = 0.5 / (source / 2)
        coords = (np.arange(out) + 0.5) * source / out - source / 2
        radius = np.sqrt(coords[None, :] ** 2 + coords[:, None] ** 2)
        freq = rate * radius * source / out
        stop, passband = freq > 0.5 * 1.3, freq < 0.5 * 0.5
        ideal = zone_plate_values(source, out, rate)
        row = {"case": f"zone plate {source} -> {out}"}
        for name, result in routes.items():
            grey = result[..., 0].astype(np.float64)
            row[f"alias_rms_{name}"] = round(float(np.sqrt(np.mean((grey[stop] - 127.5) ** 2))), 3)
            row[f"passband_rms_{name}"] = round(
                float(np.sqrt(np.mean((grey[passband] - ideal[passband]) ** 2))), 3)
        rows.append(row)
    return rows


def targets(photos: list[dict], zones: list[dict]) -> list[dict]:
    out = []

    def add(name, value, goal, ok):
        out.append({"target": name, "value": round(value, 4), "goal": goal,
                    "result": "PASS" if ok else "FAIL"})

    for row in photos:
        d_psnr = row["psnr_ours"] - row["psnr_pillow"]
        d_ssim = row["ssim_ours"] - row["ssim_pillow"]
        add(f"{row['case']}: PSNR to reference, ours - Pillow (dB)", d_psnr, ">= -0.1",
            d_psnr >= -0.1)
        add(f"{row['case']}: SSIM to reference, ours - Pillow", d_ssim, ">= -0.001",
            d_ssim >= -0.001)
    for row in zones:
        for kind in ("alias", "passband"):
            ratio = row[f"{kind}_rms_ours"] / max(row[f"{kind}_rms_pillow"], 1e-9)
            add(f"{row['case']}: {kind} RMS, ours / Pillow", ratio, "<= 1.05", ratio <= 1.05)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", type=int, default=8,
                        help="seeded ImageNet-like crops besides the two photos (default 8)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = parser.parse_args(argv)
    photos, zones = photo_rows(args.variants), zone_rows()
    checks = targets(photos, zones)
    print(f"{'case':<24} {'n':>3} {'PSNR Pillow':>11} {'PSNR ours':>9} {'SSIM Pillow':>11} "
          f"{'SSIM ours':>9} {'ours~Pillow dB':>14} {'max|d|':>6}")
    for r in photos:
        print(f"{r['case']:<24} {r['images']:>3} {r['psnr_pillow']:>11.2f} {r['psnr_ours']:>9.2f} "
              f"{r['ssim_pillow']:>11.4f} {r['ssim_ours']:>9.4f} {r['psnr_ours_vs_pillow']:>14.2f} "
              f"{r['max_abs_ours_vs_pillow']:>6}")
    print(f"\n{'case':<24} {'alias Pillow':>12} {'alias ours':>10} {'passband Pillow':>15} "
          f"{'passband ours':>13}   (RMS levels; lower is better)")
    for r in zones:
        print(f"{r['case']:<24} {r['alias_rms_pillow']:>12.3f} {r['alias_rms_ours']:>10.3f} "
              f"{r['passband_rms_pillow']:>15.3f} {r['passband_rms_ours']:>13.3f}")
    print()
    for c in checks:
        print(f"{c['target']:<62} {c['value']:>8} {c['goal']:>9}  {c['result']}")
    write_json(args.out, {
        "benchmark": "resample_quality",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "reference": f"float64 Lanczos-{REFERENCE_LOBES}, Pillow's pixel centres, one rounding",
        "machine": {"python": platform.python_version(), "pillow": Image.__version__,
                    "numpy": np.__version__},
        "photos": photos, "zone_plate": zones, "targets": checks})
    return 0 if all(c["result"] == "PASS" for c in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
