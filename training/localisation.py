"""Does attention point at the object? The localisation score of a spatial mask against a box.

For one image and one attention module: upsample the module's spatial map ``(h, w)`` to the canvas
with nearest-neighbour (each map cell spreads its value evenly over the canvas patch it covers), and
take the share of the map's total mass that lies inside the object's box. A map all inside the box
scores 1.0; a uniform map scores the box's share of the canvas area, the chance level to compare
with.

The mass share is diluted by the sigmoid masks' baseline (a mask of 0.5 everywhere with a peak on the
digit still spreads most of its mass outside a small box), so the pointing game (Zhang et al.,
"Top-down Neural Attention by Excitation Backprop", ECCV 2016) is reported beside it: the share of
images whose mask maximum (centre of the highest map cell) falls inside the box.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def box_mask(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """``(N, 1, H, W)`` bool: True inside each ``(x0, y0, x1, y1)`` box (ends exclusive)."""
    height, width = size
    ys = torch.arange(height, device=boxes.device)[None, :, None]
    xs = torch.arange(width, device=boxes.device)[None, None, :]
    x0, y0, x1, y1 = (boxes[:, i, None, None] for i in range(4))
    return ((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1))[:, None]


def box_share(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """``(N,)``: each box's share of the canvas area, what a uniform map scores."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return area.double() / (size[0] * size[1])


def localisation_score(spatial: Tensor, boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """``(N,)``: share of each ``(N, 1, h, w)`` map's mass that falls inside its box on the canvas."""
    upsampled = F.interpolate(spatial.double(), size=size, mode="nearest")
    inside = (upsampled * box_mask(boxes, size)).sum((1, 2, 3))
    return inside / upsampled.sum((1, 2, 3)).clamp(min=1e-12)


def pointing_hit(spatial: Tensor, boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """``(N,)`` bool: the centre of each map's highest cell lies inside its box."""
    n, _, h, w = spatial.shape
    peak = spatial.reshape(n, -1).argmax(1)
    y = (peak // w + 0.5) * size[0] / h
    x = (peak % w + 0.5) * size[1] / w
    return (x >= boxes[:, 0]) & (x < boxes[:, 2]) & (y >= boxes[:, 1]) & (y < boxes[:, 3])


@torch.no_grad()
def localisation(model: nn.Module, loader, *, device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean localisation score per attention module over ``(image, label, box)`` batches, plus ``box_share``.

    Pointing-game hit rates come under ``"pointing:<module>"``.
    """
    model.eval()
    totals: dict[str, float] = defaultdict(float)
    count = 0
    for images, _, boxes in loader:
        images, boxes = images.to(device), boxes.to(device)
        size = (images.shape[-2], images.shape[-1])
        _, maps = model.forward_with_attention(images)
        for name, attention_map in maps.items():
            totals[name] += localisation_score(attention_map.spatial, boxes, size).sum().item()
            totals[f"pointing:{name}"] += pointing_hit(attention_map.spatial, boxes, size).sum().item()
        totals["box_share"] += box_share(boxes, size).sum().item()
        count += len(images)
    return {name: total / max(count, 1) for name, total in totals.items()}
