"""What a JPEG costs to become the model's uint8 input, by decoder and DCT scale, and how far each way moves the pixels.

    .venv/bin/python -m bench.decode_cost --rounds 9

scikit-image's photos, encoded as JPEG (quality 90) at their own size and upscaled (bicubic) to ``--sizes`` px on
the long side, go to two model inputs: 224 RGB (ImageNet's resize 256, crop 224) and 48 greyscale (stretch). The
ways, timed interleaved in a shuffled order each round (median and quartiles of ``--rounds``), all ending in the
codec's uint8 Pillow resize (:func:`service.codec.to_pixels`):

* ``macula``: the codec's public path as the service runs it (``service.codec.preprocess``);
* ``full``: Pillow decodes every pixel, the reference the differences are taken against;
* ``pillow 4x old`` / ``pillow 2x old``: Pillow's ``draft`` (DCT scaling by 1/2, 1/4, 1/8) never below 4× or 2×
  the size the model needs, resampling the decoded image's whole extent (the codec before this benchmark);
* ``pillow 2x`` / ``pillow 1x``: the same at 2× or 1×, resampling the region the original covers in the scaled
  decode (exact geometry);
* ``simplejpeg 2x``: libjpeg-turbo through simplejpeg at the same power-of-two scales, exact geometry (after
  Pillow has read the header, as the codec would still have to);
* ``simplejpeg 2x k/8``: simplejpeg's own choice among libjpeg-turbo's k/8 scales, exact geometry.

PyTurboJPEG is not among them: it is a ctypes wrapper that needs the system's libturbojpeg (its wheel ships no
library), and neither this machine nor CI has one.

Accuracy is the largest and the mean absolute difference, in grey levels, of each way's uint8 input from the
full decode's. Last, ``--pair`` (two ways) runs head to head on every case both decode at reduced scale: A B B A
(B A A B every other round) back to back, ``--pair-rounds`` times, and reports B's time over A's, per round.
"""

from __future__ import annotations

import argparse
import io
import math
import random
import statistics
import time
from collections.abc import Callable

import numpy as np
import simplejpeg
from PIL import Image
from skimage import data

from models import Preprocessing
from service.codec import content_region, preprocess, to_pixels

PHOTOS = ("astronaut", "chelsea", "coffee", "retina")
MODELS = {
    "224 RGB": Preprocessing(input_size=(224, 224), resize_mode="center_crop", resize_size=256),
    "48 L": Preprocessing(input_size=(48, 48), resize_mode="stretch", resize_size=48, mean=(0.5,), std=(0.25,),
                          color="L"),
}
MAX_PIXELS = 40_000_000


def jpeg(name: str, long_side: int | None, quality: int = 90) -> bytes:
    """scikit-image's ``name`` photo as a JPEG, its long side scaled to ``long_side`` (None: as it ships)."""
    img = Image.fromarray(getattr(data, name)())
    if long_side is not None:
        factor = long_side / max(img.size)
        img = img.resize((round(img.width * factor), round(img.height * factor)), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def needed(pre: Preprocessing, margin: int) -> int:
    """The short side a scaled decode must keep: ``margin`` × the larger of the input and the resize size."""
    return margin * max(*pre.input_size, pre.resize_size if pre.resize_mode == "center_crop" else 0)


def pillow(blob: bytes, pre: Preprocessing, margin: int | None, *, exact: bool) -> np.ndarray:
    """Pillow, drafted no smaller than ``margin`` × what the model needs (None: full decode)."""
    img = Image.open(io.BytesIO(blob))
    original, scale = img.size, 1.0
    wanted = needed(pre, margin) / min(img.size) if margin else 1.0
    if wanted < 0.5:
        drafted = img.draft(pre.color, (math.ceil(img.width * wanted), math.ceil(img.height * wanted)))
        scale = 1.0 if drafted is None else 1 / round(original[0] / drafted[1][2])
    img = img if img.mode == pre.color else img.convert(pre.color)
    if not exact:
        return to_pixels(img, pre)
    return to_pixels(img, pre, original=original, region=content_region(img.size, original, scale))


def turbo(blob: bytes, pre: Preprocessing, margin: int, *, eighths: bool) -> np.ndarray:
    """simplejpeg at a power-of-two scale like Pillow's draft, or (``eighths``) at its own choice of k/8, after
    Pillow has read the header (the codec reads it anyway: format, pixel limit, EXIF orientation)."""
    width, height = Image.open(io.BytesIO(blob)).size
    side = needed(pre, margin)
    if eighths:
        min_w = min_h = side
    else:
        factor = 1 << max(0, min(3, int(math.log2(min(width, height) / side))))
        min_w, min_h = math.ceil(width / factor), math.ceil(height / factor)
    arr = simplejpeg.decode_jpeg(blob, "GRAY" if pre.color == "L" else "RGB", min_height=min_h, min_width=min_w)
    img = Image.fromarray(arr[:, :, 0] if pre.color == "L" else arr)
    scale = next(k / 8 for k in range(1, 9) if (math.ceil(width * k / 8), math.ceil(height * k / 8)) == img.size)
    return to_pixels(img, pre, original=(width, height), region=content_region(img.size, (width, height), scale))


WAYS: dict[str, Callable[[bytes, Preprocessing], np.ndarray]] = {
    "macula": lambda b, p: preprocess(b, max_pixels=MAX_PIXELS, pre=p).pixels,
    "full": lambda b, p: pillow(b, p, None, exact=True),
    "pillow 4x old": lambda b, p: pillow(b, p, 4, exact=False),
    "pillow 2x old": lambda b, p: pillow(b, p, 2, exact=False),
    "pillow 2x": lambda b, p: pillow(b, p, 2, exact=True),
    "pillow 1x": lambda b, p: pillow(b, p, 1, exact=True),
    "simplejpeg 2x": lambda b, p: turbo(b, p, 2, eighths=False),
    "simplejpeg 2x k/8": lambda b, p: turbo(b, p, 2, eighths=True),
}


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - start)


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def head_to_head(blob: bytes, pre: Preprocessing, ways: tuple[str, str], rounds: int) -> list[float]:
    """B's time over A's in each round of A B B A / B A A B, run back to back so both see the same machine."""
    a, b = (lambda: WAYS[ways[0]](blob, pre)), (lambda: WAYS[ways[1]](blob, pre))
    ratios = []
    for i in range(rounds):
        order = (a, b, b, a) if i % 2 == 0 else (b, a, a, b)
        spent = {a: 0.0, b: 0.0}
        for fn in order:
            spent[fn] += timed(fn)
        ratios.append(spent[b] / spent[a])
    return ratios


def scaled(blob: bytes, pre: Preprocessing) -> bool:
    """Whether the codec's draft rule decodes ``blob`` at reduced scale for ``pre``."""
    return min(Image.open(io.BytesIO(blob)).size) > 2 * needed(pre, 2)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--photos", default=",".join(PHOTOS))
    p.add_argument("--sizes", default="0,1500,2000,3200", help="long sides to upscale to; 0: the photo's own size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pair", default="pillow 2x,simplejpeg 2x", help="A,B for the head-to-head; empty: none")
    p.add_argument("--pair-rounds", type=int, default=25)
    args = p.parse_args(argv)
    cases = [(name, int(size), model) for name in args.photos.split(",") for size in args.sizes.split(",")
             for model in MODELS]
    blobs = {(name, size): jpeg(name, size or None) for name, size, _ in cases}
    dims = {key: Image.open(io.BytesIO(blob)).size for key, blob in blobs.items()}
    times = {(case, way): [] for case in cases for way in WAYS}
    order = [(case, way) for case in cases for way in WAYS]
    rng = random.Random(args.seed)
    for _ in range(args.rounds):
        rng.shuffle(order)
        for case, way in order:
            blob, pre = blobs[case[:2]], MODELS[case[2]]
            times[case, way].append(timed(lambda b=blob, pr=pre, w=way: WAYS[w](b, pr)))
    diffs = {}
    for case in cases:
        blob, pre = blobs[case[:2]], MODELS[case[2]]
        reference = WAYS["full"](blob, pre).astype(np.int16)
        for way in WAYS:
            diff = np.abs(WAYS[way](blob, pre).astype(np.int16) - reference)
            diffs[case, way] = (int(diff.max()), float(diff.mean()))
    report(cases, dims, times, diffs, args.rounds)
    pairs = {}
    if args.pair:
        ways = tuple(args.pair.split(","))
        pairs = {case: head_to_head(blobs[case[:2]], MODELS[case[2]], ways, args.pair_rounds) for case in cases
                 if scaled(blobs[case[:2]], MODELS[case[2]])}
        report_pairs(pairs, dims, ways, args.pair_rounds)
    return {"ms": {(*c, w): statistics.median(v) for (c, w), v in times.items()},  # (photo, size, model, way)
            "diff": {(*c, w): d for (c, w), d in diffs.items()},
            "pair": {c: statistics.median(r) for c, r in pairs.items()}}  # (photo, size, model)


def report(cases: list, dims: dict, times: dict, diffs: dict, rounds: int) -> None:
    head = "| photo | JPEG | model | " + " | ".join(WAYS) + " |\n|---|---|---|" + "---:|" * len(WAYS)
    print(f"ms per image, median [quartiles] of {rounds} interleaved rounds\n\n{head}")
    for case in cases:
        w, h = dims[case[:2]]
        cells = (f"{q2:.1f} [{q1:.1f}–{q3:.1f}]" for q1, q2, q3 in (quartiles(times[case, way]) for way in WAYS))
        print(f"| {case[0]} | {w}×{h} | {case[2]} | " + " | ".join(cells) + " |")
    print(f"\nlargest / mean absolute difference from `full`, grey levels\n\n{head}")
    for case in cases:
        w, h = dims[case[:2]]
        print(f"| {case[0]} | {w}×{h} | {case[2]} | "
              + " | ".join(f"{diffs[case, way][0]} / {diffs[case, way][1]:.2f}" for way in WAYS) + " |")
    print("\nover all cases: time relative to `pillow 4x old` (median of per-case medians, [min–max]), "
          "largest difference, mean of mean differences\n\n| way | time ratio | largest | mean |\n|---|---:|---:|---:|")
    for way in WAYS:
        ratios = [statistics.median(times[c, way]) / statistics.median(times[c, "pillow 4x old"]) for c in cases]
        print(f"| {way} | {statistics.median(ratios):.2f} [{min(ratios):.2f}–{max(ratios):.2f}] | "
              f"{max(diffs[c, way][0] for c in cases)} | {statistics.fmean(diffs[c, way][1] for c in cases):.2f} |")



def report_pairs(pairs: dict, dims: dict, ways: tuple[str, str], rounds: int) -> None:
    print(f"\nhead to head, `{ways[1]}` time / `{ways[0]}` time per A B B A round: median [quartiles] of {rounds}\n\n"
          "| photo | JPEG | model | ratio | rounds below 1 |\n|---|---|---|---:|---:|")
    for case, ratios in pairs.items():
        w, h = dims[case[:2]]
        q1, q2, q3 = quartiles(ratios)
        below = sum(r < 1 for r in ratios)
        print(f"| {case[0]} | {w}×{h} | {case[2]} | {q2:.2f} [{q1:.2f}–{q3:.2f}] | {below}/{len(ratios)} |")
    if pairs:
        medians = [statistics.median(r) for r in pairs.values()]
        print(f"\nmedian over cases {statistics.median(medians):.2f} [{min(medians):.2f}–{max(medians):.2f}]")


if __name__ == "__main__":
    main()
