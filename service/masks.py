"""A prediction's attention masks: which modules a client asked for (``modules=``), and the PNG work, spread over
the decode pool's threads (Pillow releases the GIL while it resizes and encodes).

Feature-size masks are small PNGs: one pool job per image. Original-size masks are the costly ones (a 500×400
mask per module): one job per (image, module), so that a request's masks encode on every core at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from .codec import DecodedImage
from .decoding import DecodePool
from .formatting import attention_entries, capped_size
from .inference import ImageResult, ModelRunner


class UnknownModule(Exception):
    """``modules`` names a module the model does not have (or the model has none)."""


def select_modules(runner: ModelRunner, modules: Sequence[str] | None) -> list[str] | None:
    """The attention modules asked for, checked against the model's, in network order (None: all of them)."""
    if modules is None:
        return None
    known = runner.attention_modules if runner.has_attention else []
    if not known:
        raise UnknownModule(f"model {runner.name!r} has no attention modules; leave out 'modules'")
    for name in modules:
        if name not in known:
            raise UnknownModule(f"unknown attention module {name!r} in 'modules'; model {runner.name!r} has: "
                                f"{', '.join(known)}")
    return [name for name in known if name in modules]


def mask_jobs(images: list[DecodedImage], results: list[ImageResult], *, original_size: bool, max_side: int,
              modules: list[str] | None = None) -> list[list[tuple[Callable[..., Any], tuple]]]:
    """The PNG work for each image, as (function, args) jobs for the decode pool whose results, concatenated in
    order, are the image's attention entries: one job for an image's feature-size masks (small PNGs), one per
    module with original-size masks (the costly ones, spread over the pool's threads). ``modules``: only those."""
    jobs = []
    for image, result in zip(images, results, strict=True):
        masks = {k: v for k, v in (result.masks or {}).items() if modules is None or k in modules}
        if not original_size:
            jobs.append([(attention_entries, (masks, image, None))])
            continue
        original = capped_size(image.width, image.height, max_side)
        jobs.append([(attention_entries, ({module: mask}, image, original)) for module, mask in masks.items()])
    return jobs


async def add_masks(pool: DecodePool, images: list[DecodedImage], results: list[ImageResult],
                    items: list[dict[str, Any]], *, original_size: bool, max_side: int,
                    modules: list[str] | None = None) -> None:
    """Fill each item's ``attention`` entries, the PNG work in ``pool`` (one share: the request's turn)."""
    share = pool.share()
    jobs = mask_jobs(images, results, original_size=original_size, max_side=max_side, modules=modules)
    done = await asyncio.gather(*(asyncio.gather(*(pool.run(share, fn, *args) for fn, args in image))
                                  for image in jobs))
    for item, parts in zip(items, done, strict=True):
        item["attention"] = [entry for part in parts for entry in part]
