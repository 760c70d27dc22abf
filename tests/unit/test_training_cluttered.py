"""Cluttered MNIST: the box holds the digit, splits are fixed, training canvases are re-drawn."""

from __future__ import annotations

import numpy as np
import pytest

from training.cluttered import ClutteredMNIST, ink_crop, mnist5k, split_indices


@pytest.fixture(scope="module")
def digits():
    return mnist5k()


def test_splits_are_disjoint_fixed_and_cover_the_sample():
    parts = [split_indices(5000, s) for s in ("train", "val", "test")]
    assert [len(p) for p in parts] == [4000, 500, 500]
    assert len(np.unique(np.concatenate(parts))) == 5000
    assert np.array_equal(parts[2], split_indices(5000, "test"))  # same split every time
    assert not np.array_equal(parts[2], split_indices(5000, "test", split_seed=1))


@pytest.mark.parametrize("size,clutter", [(64, 6), (48, 4), (28, 3)])
def test_box_holds_exactly_the_digit_and_clutter_stays_outside(digits, size, clutter):
    images, labels = digits
    data = ClutteredMNIST(images[:50], labels[:50], canvas_size=size, clutter=clutter, seed=3)
    for i in range(50):
        sample = data.draw(i)
        x0, y0, x1, y1 = sample.box
        assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
        assert sample.label == labels[i]
        # the canvas inside the box is the digit's ink crop, pixel for pixel: nothing pasted over it
        assert np.array_equal(sample.image[y0:y1, x0:x1], ink_crop(images[i]))
        # the digit's ink touches all four sides of its box (a tight box)
        crop = sample.image[y0:y1, x0:x1]
        assert crop[0].any() and crop[-1].any() and crop[:, 0].any() and crop[:, -1].any()


def test_clutter_is_drawn_outside_the_box(digits):
    images, labels = digits
    cluttered = ClutteredMNIST(images[:20], labels[:20], canvas_size=64, clutter=6, seed=0)
    clean = ClutteredMNIST(images[:20], labels[:20], canvas_size=64, clutter=0, seed=0)
    extra_ink = [int((cluttered.draw(i).image > 0).sum() - (clean.draw(i).image > 0).sum()) for i in range(20)]
    assert all(e > 0 for e in extra_ink)


def test_training_canvases_are_redrawn_per_epoch_fixed_splits_are_not(digits):
    images, labels = digits
    train = ClutteredMNIST(images[:5], labels[:5], canvas_size=48, redraw=True)
    fixed = ClutteredMNIST(images[:5], labels[:5], canvas_size=48, redraw=False)
    before = [train.draw(i).image for i in range(5)], [fixed.draw(i).image for i in range(5)]
    assert all(np.array_equal(a, train.draw(i).image) for i, a in enumerate(before[0]))  # deterministic
    train.set_epoch(1)
    fixed.set_epoch(1)
    assert not any(np.array_equal(a, train.draw(i).image) for i, a in enumerate(before[0]))
    assert all(np.array_equal(a, fixed.draw(i).image) for i, a in enumerate(before[1]))
