"""Metric maths on hand-made arrays, with scikit-learn as the oracle where it has the same definition."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, jaccard_score, matthews_corrcoef

from busi_batch import metrics


def square(size: int, top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[top:top + side, left:left + side] = True
    return mask


def test_perfect_overlap_is_one() -> None:
    m = square(10, 2, 2, 4)
    assert metrics.dice_score(m, m) == 1.0
    assert metrics.iou_score(m, m) == 1.0


def test_disjoint_is_zero() -> None:
    assert metrics.dice_score(square(10, 0, 0, 3), square(10, 5, 5, 3)) == 0.0
    assert metrics.iou_score(square(10, 0, 0, 3), square(10, 5, 5, 3)) == 0.0


def test_dice_and_iou_match_sklearn_on_random_masks() -> None:
    rng = np.random.default_rng(1)
    for _ in range(5):
        a, b = rng.random((20, 20)) > 0.6, rng.random((20, 20)) > 0.5
        assert metrics.dice_score(a, b) == pytest.approx(f1_score(b.ravel(), a.ravel()))
        assert metrics.iou_score(a, b) == pytest.approx(jaccard_score(b.ravel(), a.ravel()))


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.dice_score(np.zeros((2, 2)), np.zeros((3, 3)))


def test_segmentation_summary_separates_lesion_images_from_all() -> None:
    summary = metrics.segmentation_metrics(
        dice=[0.8, 0.6, 1.0, 0.0], iou=[0.7, 0.5, 1.0, 0.0],
        truth_has_lesion=[True, True, False, False], pred_has_lesion=[True, True, False, True],
    )
    assert summary["dice_mean"] == pytest.approx(0.7)
    assert summary["iou_mean"] == pytest.approx(0.6)
    assert summary["dice_mean_all"] == pytest.approx(0.6)
    assert summary["false_positive_rate_normal"] == pytest.approx(0.5)
    assert summary["n_with_lesion"] == 2 and summary["n_without_lesion"] == 2
    assert "both masks empty" in summary["empty_mask_rule"]


def test_segmentation_summary_without_lesions_has_no_lesion_mean() -> None:
    summary = metrics.segmentation_metrics([1.0], [1.0], [False], [False])
    assert summary["dice_mean"] is None and summary["false_positive_rate_normal"] == 0.0


def test_classification_metrics_against_sklearn() -> None:
    y_true = [0, 0, 1, 1, 1, 2, 2, 2, 2, 1]
    y_pred = [0, 1, 1, 1, 2, 2, 2, 0, 2, 1]
    probs = np.eye(3)[y_pred] * 0.7 + 0.1
    result = metrics.classification_metrics(y_true, y_pred, probs, ["normal", "benign", "malignant"], n_boot=200)
    assert result["accuracy"] == pytest.approx(0.7)
    assert result["mcc"] == pytest.approx(matthews_corrcoef(y_true, y_pred))
    assert result["f1_weighted"] == pytest.approx(f1_score(y_true, y_pred, average="weighted"))
    assert result["f1_macro"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert result["confusion_matrix"] == [[1, 1, 0], [0, 3, 1], [1, 0, 3]]
    malignant = result["per_class"]["malignant"]
    assert malignant["recall"] == pytest.approx(0.75) and malignant["support"] == 4
    # specificity of malignant: 6 non-malignant, 1 predicted malignant -> 5/6
    assert malignant["specificity"] == pytest.approx(5 / 6)
    lo, hi = result["accuracy_ci95"]
    assert lo <= result["accuracy"] <= hi
    assert set(result["roc_auc"]) == {"normal", "benign", "malignant"}


def test_bootstrap_is_deterministic_and_brackets_the_estimate() -> None:
    y = np.array([0, 1] * 20)
    p = y.copy()
    p[:6] = 1 - p[:6]
    a = metrics.bootstrap_ci(lambda t, q: float(np.mean(t == q)), y, p, n_boot=300, seed=3)
    b = metrics.bootstrap_ci(lambda t, q: float(np.mean(t == q)), y, p, n_boot=300, seed=3)
    assert a == b and a[0] < 0.85 < a[1]


def test_specificity_per_class() -> None:
    cm = np.array([[5, 0], [2, 3]])
    # class 0: TN 3, FP 2 (two class-1 images called 0); class 1: TN 5, FP 0
    assert metrics.specificity_per_class(cm).tolist() == pytest.approx([3 / 5, 5 / 5])


def test_expected_calibration_error() -> None:
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    assert metrics.expected_calibration_error(probs, [0, 0, 0, 1]) == pytest.approx(0.5 * 0.1 + 0.5 * 0.1)
    perfect = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert metrics.expected_calibration_error(perfect, [0, 1]) == 0.0


# ------------------------------------------------------------------------------------------ calibration
def test_reliability_bins_by_hand() -> None:
    from busi_batch.metrics import reliability_bins

    probs = np.array([[0.95, 0.05, 0.0], [0.05, 0.95, 0.0], [0.55, 0.45, 0.0], [0.35, 0.33, 0.32]])
    y = np.array([0, 0, 1, 0])  # right, wrong, wrong, right
    bins = reliability_bins(probs, y, n_bins=10)
    assert [b["count"] for b in bins] == [0, 0, 0, 1, 0, 1, 0, 0, 0, 2]
    assert bins[9]["confidence"] == pytest.approx(0.95) and bins[9]["accuracy"] == pytest.approx(0.5)
    assert bins[5]["accuracy"] == 0.0 and bins[3]["accuracy"] == 1.0 and bins[0]["confidence"] is None


def test_ece_and_its_interval_by_hand() -> None:
    from busi_batch.metrics import classification_metrics

    # confidence 0.9 everywhere, 60% right: ECE = |0.9 - 0.6| = 0.3 exactly
    probs = np.tile([0.9, 0.05, 0.05], (10, 1))
    y = np.array([0] * 6 + [1] * 4)
    result = classification_metrics(y, probs.argmax(axis=1), probs, ["normal", "benign", "malignant"], n_boot=200)
    assert result["ece"] == pytest.approx(0.3)
    low, high = result["ece_ci95"]
    assert low < 0.3 < high and 0.0 <= low and high <= 0.9


def test_roc_curve_points_match_a_hand_ranking() -> None:
    from busi_batch.metrics import roc_curves

    probs = np.array([[0.1, 0.9, 0.0], [0.4, 0.6, 0.0], [0.35, 0.65, 0.0], [0.8, 0.2, 0.0]])
    y = np.array([1, 1, 0, 0])
    curves = roc_curves(y, probs, ["normal", "benign", "malignant"])
    # benign scores: positives 0.9, 0.6; negatives 0.65, 0.2 -> TPR steps 0 -> .5 (0.9) -> .5/.5 (0.65) -> 1 (0.6)
    assert curves["benign"]["tpr"] == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert curves["benign"]["fpr"] == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert curves["malignant"] is None  # no malignant image: no curve


# ------------------------------------------------------------------------------------ end to end, independent oracle


def _bootstrap_oracle(statistic, y_true: np.ndarray, y_pred: np.ndarray, n_boot: int = 1000) -> list[float]:
    """The documented interval (percentile bootstrap over images, 1000 resamples, numpy seed 0), written out here."""
    rng = np.random.default_rng(0)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, y_true.size, y_true.size)
        values.append(statistic(y_true[idx], y_pred[idx]))
    return [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))]


def test_metrics_json_equals_sklearn_on_predictions_csv(tiny_weights, tmp_path) -> None:
    """metrics.json against sklearn computed here from predictions.csv (read with the csv module, not ours) and the
    mask files: accuracy, MCC, AUC per class, the confusion matrix, both CIs' values, and Dice per row."""
    import csv

    import cv2
    from sklearn.metrics import accuracy_score, confusion_matrix, roc_auc_score
    from typer.testing import CliRunner

    from busi_batch.cli import app
    from test_faults import make_study

    study = make_study(tmp_path / "study", 18, seed=4)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(study), "--out", str(out), "--weights", str(tiny_weights), "-j", "0"])
    assert result.exit_code == 0, result.output
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    order = ["normal", "benign", "malignant"]
    y_true = np.array([order.index(r["image"].split("/")[0]) for r in rows])
    y_pred = np.array([order.index(r["pred_class"]) for r in rows])
    probs = np.array([[float(r[f"p_{c}"]) for c in order] for r in rows])
    got = __import__("json").loads((out / "metrics.json").read_text())
    cls = got["classification"]
    assert cls["n_images"] == 18
    assert cls["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert cls["mcc"] == pytest.approx(matthews_corrcoef(y_true, y_pred))
    assert cls["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=[0, 1, 2]).tolist()
    for k, name in enumerate(order):
        assert cls["roc_auc"][name] == pytest.approx(roc_auc_score(y_true == k, probs[:, k]))
    assert cls["accuracy_ci95"] == pytest.approx(
        _bootstrap_oracle(lambda t, p: float(np.mean(t == p)), y_true, y_pred))

    def mcc(t: np.ndarray, p: np.ndarray) -> float:
        return 0.0 if len(set(t)) < 2 and len(set(p)) < 2 else float(matthews_corrcoef(t, p))

    assert cls["mcc_ci95"] == pytest.approx(_bootstrap_oracle(mcc, y_true, y_pred))
    dice = []
    for r in rows:
        pred = cv2.imread(str(out / r["mask"]), cv2.IMREAD_UNCHANGED) > 0
        truth = cv2.imread(str(study / r["image"].replace(".png", "_mask.png")), cv2.IMREAD_UNCHANGED) > 0
        expected = 1.0 if not pred.any() and not truth.any() else f1_score(truth.ravel(), pred.ravel())
        assert float(r["dice"]) == pytest.approx(expected, abs=1e-5), r["image"]
        if truth.any():
            dice.append(expected)
    assert got["segmentation"]["dice_mean"] == pytest.approx(np.mean(dice), abs=1e-5)
