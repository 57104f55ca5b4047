"""The operating-point study's maths on hand-made predictions: decisions under a bias, the choice, nesting."""

from __future__ import annotations

import numpy as np
import pytest

from train.operating_point import MALIGNANT, NORMAL, OutOfFold, adopt, choose_bias, decide, nested, scores

N, B, M = NORMAL, 1, MALIGNANT


def log_probs(rows: list[list[float]]) -> np.ndarray:
    return np.log(np.array(rows, dtype=float))


def test_a_malignant_bias_turns_a_close_benign_call_malignant_but_not_a_clear_one() -> None:
    lp = log_probs([[0.1, 0.5, 0.4], [0.1, 0.8, 0.1]])
    assert decide(lp, (0.0, 0.0)).tolist() == [B, B]
    assert decide(lp, (0.0, 0.5)).tolist() == [M, B]   # log(0.4) + 0.5 > log(0.5); log(0.1) + 0.5 < log(0.8)
    assert decide(lp, (1.0, 0.0)).tolist() == [B, B]   # log(0.1) + 1 < log(0.5)


def test_scores_count_outlines_only_on_truly_normal_images_not_called_normal() -> None:
    truth = np.array([N, N, N, M, M])
    decided = np.array([N, B, B, M, B])
    outline = np.array([True, True, False, True, True])
    s = scores(truth, decided, outline)
    assert s["malignant_sensitivity"] == 0.5 and s["accuracy"] == pytest.approx(0.4)
    assert s["outline_lesion_free"] == pytest.approx(1 / 3)  # image 0 is called normal: no mask; image 2 has none


def oof(fold: list[str], truth: list[int], rows: list[list[float]]) -> OutOfFold:
    return OutOfFold(np.array(fold), np.array(truth), log_probs(rows), np.zeros(len(truth), dtype=bool))


def test_the_choice_reaches_the_sensitivity_target_when_it_can_and_prefers_no_bias_otherwise_equal() -> None:
    # a malignant image scored as a close benign: only a malignant bias >= 0.25 finds it
    data = oof(["0"] * 4, [M, M, B, N], [[0.05, 0.5, 0.45], [0.1, 0.2, 0.7], [0.1, 0.8, 0.1], [0.8, 0.1, 0.1]])
    b_normal, b_malignant = choose_bias(data)
    assert b_malignant >= 0.25 and b_normal == 0.0
    assert scores(data.truth, decide(data.log_probs, (b_normal, b_malignant)), data.outline_if_lesion)[
        "malignant_sensitivity"] == 1.0
    already = oof(["0"] * 3, [M, B, N], [[0.1, 0.2, 0.7], [0.1, 0.8, 0.1], [0.8, 0.1, 0.1]])
    assert choose_bias(already) == (0.0, 0.0)  # everything right already: the smallest bias wins the tie


def test_nested_choice_never_sees_the_fold_it_is_scored_on() -> None:
    # fold "a" rewards a malignant bias, fold "b" holds a benign image that the same bias would break
    data = oof(["a", "a", "b", "b"], [M, B, B, M],
               [[0.05, 0.5, 0.45], [0.1, 0.8, 0.1], [0.05, 0.5, 0.45], [0.1, 0.2, 0.7]])
    result = nested(data)
    assert result["chosen"]["b"][1] > 0  # chosen on fold a
    assert result["chosen"]["a"] == (0.0, 0.0)  # fold b alone needs no bias
    assert result["with_bias"]["accuracy"] == pytest.approx(0.5)  # a's malignant missed, b's benign broken
    assert result["without"]["accuracy"] == pytest.approx(0.75)
    assert not adopt(result)
