"""The localisation score: 1.0 inside the box, the box's area share for a uniform map."""

from __future__ import annotations

import pytest
import torch

from training.localisation import box_mask, box_share, localisation_score, pointing_hit

SIZE = (64, 64)
BOXES = torch.tensor([[8, 16, 28, 40], [0, 0, 64, 64], [40, 4, 64, 20]])


def test_box_mask_counts_the_box_pixels():
    mask = box_mask(BOXES, SIZE)
    assert mask.shape == (3, 1, 64, 64)
    assert mask.sum((1, 2, 3)).tolist() == [20 * 24, 64 * 64, 24 * 16]
    assert mask[0, 0, 16, 8] and not mask[0, 0, 40, 8] and not mask[0, 0, 16, 28]  # ends exclusive


def test_map_all_inside_the_box_scores_one():
    spatial = torch.zeros(3, 1, 16, 16)  # a 16x16 map over a 64x64 canvas: each cell covers 4x4 pixels
    spatial[0, 0, 4:10, 2:7] = torch.rand(6, 5) + 0.1  # pixels 16..40, 8..28: inside box 0
    spatial[1] = torch.rand(1, 16, 16)
    spatial[2, 0, 1:5, 10:16] = 0.7
    assert localisation_score(spatial, BOXES, SIZE) == pytest.approx([1.0, 1.0, 1.0])


def test_uniform_map_scores_the_box_share():
    for h, w in [(64, 64), (16, 16), (8, 8), (7, 5)]:
        spatial = torch.full((3, 1, h, w), 0.3)
        scores = localisation_score(spatial, BOXES, SIZE)
        assert scores.tolist() == pytest.approx(box_share(BOXES, SIZE).tolist())
    assert box_share(BOXES, SIZE).tolist() == pytest.approx([480 / 4096, 1.0, 384 / 4096])


def test_map_outside_the_box_scores_zero_and_half_and_half_scores_half():
    spatial = torch.zeros(1, 1, 64, 64)
    spatial[0, 0, 50:60, 50:60] = 1.0
    box = BOXES[:1]
    assert localisation_score(spatial, box, SIZE).item() == 0.0
    spatial[0, 0, 20:30, 10:20] = 1.0  # same mass inside the box
    assert localisation_score(spatial, box, SIZE).item() == pytest.approx(0.5)


def test_pointing_game_checks_where_the_peak_cell_is():
    spatial = torch.zeros(3, 1, 16, 16)
    spatial[0, 0, 6, 3] = 1.0  # cell centre (14, 26) in canvas pixels: inside box 0 (x 8..28, y 16..40)
    spatial[1, 0, 15, 15] = 1.0  # box 1 is the whole canvas
    spatial[2, 0, 10, 2] = 1.0  # centre (10, 42): outside box 2 (x 40..64, y 4..20)
    assert pointing_hit(spatial, BOXES, SIZE).tolist() == [True, True, False]
