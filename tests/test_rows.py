"""``rows.score_masks``, the one scorer of a predicted mask, on hand-made arrays (its maths: test_metrics)."""

from __future__ import annotations

import numpy as np
import pytest

from busi_batch.rows import score_masks


def square(size: int, top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[top:top + side, left:left + side] = True
    return mask


def test_both_empty_is_one_and_one_empty_is_zero() -> None:
    empty = np.zeros((5, 5), bool)
    lesion = square(5, 1, 1, 2)
    assert score_masks(empty, empty) == (1.0, 1.0, 0, 0)
    assert score_masks(lesion, empty) == (0.0, 0.0, 0, 4)  # a lesion predicted where there is none
    assert score_masks(empty, lesion) == (0.0, 0.0, 4, 0)  # a missed lesion
    assert not score_masks(empty, empty).truth_has_lesion and score_masks(lesion, empty).predicted_has_lesion


def test_half_overlap() -> None:
    pred = np.zeros((4, 4), bool)
    truth = np.zeros((4, 4), bool)
    pred[:, :2] = True      # 8 pixels
    truth[:, 1:3] = True    # 8 pixels, 4 shared
    scores = score_masks(pred, truth)
    assert scores.dice == pytest.approx(0.5)
    assert scores.iou == pytest.approx(4 / 12)
    assert (scores.truth_area_px, scores.predicted_area_px) == (8, 8)
    assert score_masks(pred.astype(np.uint8) * 255, truth) == scores  # a mask as its PNG holds it
