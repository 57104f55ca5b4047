"""The committed BUSI split: groups never cross the test boundary, flawed images excluded, test stratified."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent

from train.split import (  # noqa: E402
    EXCLUDED,
    EXCLUDED_IDENTICAL,
    TEST,
    assign_folds,
    group_ids,
    load_split,
    make_split,
    perceptual_pairs,
)

SPLIT = REPO / "train" / "splits" / "busi_v1.csv"
BUSI = REPO.parent / "shared" / "data" / "busi"


@pytest.fixture(scope="module")
def split() -> pd.DataFrame:
    return load_split(SPLIT)


def used(split: pd.DataFrame) -> pd.DataFrame:
    return split[split["fold"] != EXCLUDED]


def test_columns_and_fold_values(split: pd.DataFrame) -> None:
    assert list(split.columns) == ["image", "class", "group", "fold"]
    assert set(split["fold"]) == {TEST, EXCLUDED, "0", "1", "2", "3", "4"}
    assert split["image"].is_unique
    assert len(split) == 780
    assert (split["image"].str.split("/").str[0] == split["class"]).all()


def test_no_group_crosses_the_test_boundary(split: pd.DataFrame) -> None:
    sides = used(split).groupby("group")["fold"].agg(lambda f: set(f == TEST))
    assert (sides.map(len) == 1).all(), sides[sides.map(len) > 1]


def test_no_group_crosses_cross_validation_folds(split: pd.DataFrame) -> None:
    folds = used(split).groupby("group")["fold"].nunique()
    assert (folds == 1).all()


def test_byte_identical_cross_class_pair_is_excluded(split: pd.DataFrame) -> None:
    rows = split.set_index("image").loc[list(EXCLUDED_IDENTICAL)]
    assert (rows["fold"] == EXCLUDED).all()
    assert rows["group"].nunique() == 1
    assert (split["fold"] == EXCLUDED).sum() == 2


def test_listed_near_duplicates_never_straddle_test_and_train(split: pd.DataFrame) -> None:
    pairs_csv = BUSI / "near_duplicate_candidates.csv"
    if not pairs_csv.is_file():
        pytest.skip(f"{pairs_csv} not available")
    pairs = pd.read_csv(pairs_csv)
    fold = split.set_index("image")["fold"]
    checked = 0
    for a, b in zip(pairs["image_a"], pairs["image_b"]):
        if EXCLUDED in (fold[a], fold[b]):
            continue
        assert (fold[a] == TEST) == (fold[b] == TEST), (a, b)
        assert fold[a] == fold[b], (a, b)
        checked += 1
    assert checked >= 200


def test_test_portion_is_about_a_fifth_and_stratified(split: pd.DataFrame) -> None:
    kept = used(split)
    test = kept[kept["fold"] == TEST]
    assert 0.15 <= len(test) / len(kept) <= 0.25
    overall = kept["class"].value_counts(normalize=True)
    in_test = test["class"].value_counts(normalize=True)
    assert (abs(in_test - overall) < 0.03).all(), (in_test, overall)


def test_committed_split_is_reproducible() -> None:
    if not (BUSI / "benign").is_dir():
        pytest.skip(f"{BUSI} not available")
    fresh = make_split(BUSI)
    committed = load_split(SPLIT)
    pd.testing.assert_frame_equal(fresh.reset_index(drop=True), committed, check_dtype=False)


# ---------------------------------------------------------------------------------------------- unit level
def test_group_ids_are_connected_components() -> None:
    groups = group_ids(6, [(0, 1), (1, 2), (4, 5)])
    assert groups.tolist() == [0, 0, 0, 3, 4, 4]


def test_perceptual_pairs_find_a_brightened_copy_and_not_a_different_image() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((64 * 64,)).astype(np.float32)
    thumbs = np.stack([a, 0.8 * a + 0.1, rng.random(64 * 64).astype(np.float32)])
    bits = np.zeros((3, 64), dtype=bool)
    bits[2] = rng.random(64) > 0.5  # far from the other two in Hamming distance
    bits[2, :20] = True
    assert perceptual_pairs(bits, thumbs) == [(0, 1)]


def test_assign_folds_keeps_groups_whole_and_respects_exclusions() -> None:
    rng = np.random.default_rng(1)
    n = 200
    classes = rng.choice(["normal", "benign", "malignant"], size=n, p=[0.2, 0.5, 0.3])
    groups = rng.integers(0, 120, size=n)
    excluded = np.zeros(n, dtype=bool)
    excluded[[3, 7]] = True
    fold = assign_folds(classes, groups, excluded, seed=5)
    assert (fold[excluded] == EXCLUDED).all() and (fold[~excluded] != EXCLUDED).all()
    table = pd.DataFrame({"g": groups[~excluded], "f": fold[~excluded]})
    assert (table.groupby("g")["f"].nunique() == 1).all()
    assert (assign_folds(classes, groups, excluded, seed=5) == fold).all()
