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
