"""Post-processing maths on hand-made arrays."""

from __future__ import annotations

import numpy as np
import pytest

from busi_batch.postprocess import (
    MaskRules, area_mm2, binarise, lesion_area, lesion_count, lesion_mask, probability_to_size, remove_small_components,
)


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


def test_small_components_are_dropped_and_large_ones_kept_whole() -> None:
    mask = np.zeros((20, 20), bool)
    mask[2:8, 2:8] = True  # 36 px
    mask[15, 15] = True  # 1 px speck
    mask[12:14, 2:4] = True  # 4 px
    kept = remove_small_components(mask, 4)
    assert kept[2:8, 2:8].all() and kept[12:14, 2:4].all() and not kept[15, 15]
    assert lesion_area(remove_small_components(mask, 5)) == 36
    assert np.array_equal(remove_small_components(mask, 0), mask)


def test_lesion_mask_applies_the_rules_in_order() -> None:
    prob = np.zeros((10, 10), np.float32)
    prob[1:6, 1:6] = 0.8  # 25% of the frame
    prob[8, 8] = 0.45  # faint speck: kept only by a low threshold
    plain = lesion_mask(prob, 10, 10, "benign")
    assert lesion_area(plain) == 25
    low = lesion_mask(prob, 10, 10, "benign", MaskRules(threshold=0.4))
    assert lesion_area(low) == 26 and lesion_count(low) == 2
    cleaned = lesion_mask(prob, 10, 10, "benign", MaskRules(threshold=0.4, min_component_fraction=0.02))
    assert lesion_area(cleaned) == 25 and lesion_count(cleaned) == 1
    rules = MaskRules(empty_when_normal=True)
    assert not lesion_mask(prob, 10, 10, "normal", rules).any()
    assert lesion_area(lesion_mask(prob, 10, 10, "malignant", rules)) == 25
    assert lesion_mask(prob, 30, 40, "normal", rules).shape == (30, 40)


def test_mask_rules_key_tells_rules_apart() -> None:
    keys = {MaskRules().key(), MaskRules(0.4).key(), MaskRules(min_component_fraction=0.001).key(),
            MaskRules(empty_when_normal=True).key()}
    assert len(keys) == 4


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


def _full_frame_reference(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """Component removal labelled over the whole frame: what the bounding-box shortcut must reproduce."""
    import cv2

    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = np.zeros(count, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_pixels
    return keep[labels]


@pytest.mark.parametrize("seed", range(6))
def test_component_removal_and_count_match_whole_frame_labelling(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = np.zeros((60, 80), bool)
    for _ in range(rng.integers(1, 6)):  # blobs of random size, some touching the border
        y, x = rng.integers(0, 60), rng.integers(0, 80)
        mask[y:y + rng.integers(1, 15), x:x + rng.integers(1, 15)] = True
    mask |= rng.random(mask.shape) > 0.995  # specks
    for min_pixels in (2, 5, 40):
        assert np.array_equal(remove_small_components(mask, min_pixels), _full_frame_reference(mask, min_pixels))
    import cv2

    assert lesion_count(mask) == cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)[0] - 1


def test_component_removal_leaves_its_input_alone() -> None:
    mask = np.zeros((10, 10), bool)
    mask[0, 0] = True
    mask[4:8, 4:8] = True
    before = mask.copy()
    cleaned = remove_small_components(mask, 4)
    assert np.array_equal(mask, before) and not cleaned[0, 0] and cleaned[4:8, 4:8].all()
