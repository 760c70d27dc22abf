"""What original-size attention masks cost: resize and PNG encoding of one image's masks, serial and spread.

    .venv/bin/python -m bench.mask_cost --size 500x400 --rounds 5

The masks of a CBAM-ResNet18 at 224 (8 modules: 56², 56², 28², 28², 14², 14², 7², 7²; smooth, like attention
maps), placed over a ``--size`` image as ``attention_size=original`` does. Times, medians over ``--rounds``
interleaved rounds: the 8-bit resize alone; PNG encoding at zlib levels 6 (Pillow's default, the service's
before) and 1 (now), with the bytes; and the service's path (one decode-pool job per module) on a 2-thread pool
against the same jobs run one after the other.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from service.codec import place_mask
from service.formatting import ORIGINAL_PNG_LEVEL, attention_entries

SIDES = (56, 56, 28, 28, 14, 14, 7, 7)


def masks(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    coarse = (rng.integers(0, 256, (4, 4), dtype=np.uint8) for _ in SIDES)
    return {f"layer{i}.cbam": np.asarray(Image.fromarray(c).resize((s, s), Image.Resampling.BILINEAR))
            for i, (c, s) in enumerate(zip(coarse, SIDES, strict=True))}


def png_bytes(mask: np.ndarray, level: int) -> int:
    buf = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buf, format="PNG", compress_level=level)
    return len(buf.getvalue())


def ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="500x400", help="the original image, WxH")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    w, h = (int(v) for v in args.size.split("x"))
    maps = masks()

    class Image_:  # what attention_entries reads of a DecodedImage
        width, height, input_box = w, h, (0, 0, w, h)

    placed = {k: place_mask(m, (0, 0, w, h), (w, h), (w, h)) for k, m in maps.items()}
    pool = ThreadPoolExecutor(2)
    jobs = [({k: m}, Image_, (w, h)) for k, m in maps.items()]
    variants = {
        "resize (8-bit bilinear) only": lambda: [place_mask(m, (0, 0, w, h), (w, h), (w, h)) for m in maps.values()],
        "PNG level 6, serial": lambda: [png_bytes(m, 6) for m in placed.values()],
        "PNG level 1, serial": lambda: [png_bytes(m, 1) for m in placed.values()],
        f"service path (level {ORIGINAL_PNG_LEVEL}), serial": lambda: [attention_entries(*j) for j in jobs],
        f"service path (level {ORIGINAL_PNG_LEVEL}), 2-thread pool": lambda: list(pool.map(
            lambda j: attention_entries(*j), jobs)),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            times[name].append(ms(fn))
    sizes = {level: sum(png_bytes(m, level) for m in placed.values()) for level in (6, 1)}
    print(f"8 masks over a {w}x{h} image, median of {args.rounds} rounds\n\n| step | ms |\n|---|---:|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.1f} |")
    print(f"\nPNG bytes of the 8 masks: level 6 {sizes[6]}, level 1 {sizes[1]}")
    return {"ms": {k: statistics.median(v) for k, v in times.items()}, "png_bytes": sizes}


if __name__ == "__main__":
    main()
