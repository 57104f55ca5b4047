"""Post-processing maths on hand-made arrays."""

from __future__ import annotations

import numpy as np
import pytest

from busi_batch.postprocess import area_mm2, binarise, lesion_area, lesion_count, probability_to_size


def test_area_and_components() -> None:
    mask = np.zeros((10, 10), bool)
    assert lesion_area(mask) == 0 and lesion_count(mask) == 0
    mask[1:3, 1:3] = True
    mask[6:9, 6:9] = True
    assert lesion_area(mask) == 13 and lesion_count(mask) == 2
    mask[3, 3] = True  # diagonal neighbour joins the first blob under 8-connectivity
    assert lesion_count(mask) == 2


def test_probability_resized_to_image_size_then_thresholded() -> None:
    prob = np.zeros((8, 8), np.float32)
    prob[:, :4] = 1.0
    full = binarise(probability_to_size(prob, 30, 50), 0.5)
    assert full.shape == (30, 50)
    assert full[:, :24].all() and not full[:, 26:].any()


def test_area_mm2() -> None:
    assert area_mm2(100, None) is None
    assert area_mm2(100, 0.1) == pytest.approx(1.0)
    assert area_mm2(100, (0.1, 0.2)) == pytest.approx(2.0)


def test_outline_overlay_draws_both_colours() -> None:
    from busi_batch.overlay import PRED_COLOUR_BGR, TRUTH_COLOUR_BGR, outline_overlay

    image = np.full((60, 80), 100, np.uint8)
    pred = np.zeros((60, 80), bool)
    truth = np.zeros((60, 80), bool)
    pred[10:30, 10:30] = True
    truth[30:50, 40:70] = True
    out = outline_overlay(image, pred, truth, thickness=1)
    assert out.shape == (60, 80, 3) and out.dtype == np.uint8
    assert (out == PRED_COLOUR_BGR).all(axis=2).any() and (out == TRUTH_COLOUR_BGR).all(axis=2).any()
    assert (out[20, 20] == 100).all()  # inside the outline the image is untouched
