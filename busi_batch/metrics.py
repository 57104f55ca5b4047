"""Segmentation and classification metrics: pure functions on arrays, no files, no DataFrames.

Definitions (also in the README and restated inside every ``metrics.json``):

* Dice = 2|P∩T| / (|P|+|T|), IoU = |P∩T| / |P∪T|, on binary masks at the image's own size.
* Empty-mask rule: both masks empty -> 1.0 (a correct "no lesion"); exactly one empty -> 0.0 (a missed lesion,
  or a lesion predicted on an image without one).
* ``dice_mean`` / ``iou_mean`` average over images whose ground truth has a lesion (the literature's convention);
  ``dice_mean_all`` / ``iou_mean_all`` over every image with a ground-truth mask, under the rule above.
* ``false_positive_rate_normal``: share of ground-truth-empty images on which a lesion was predicted.
* Classification: scikit-learn's accuracy, weighted / macro precision, recall, F1, Matthews correlation,
  confusion matrix (rows = true, columns = predicted), per-class one-vs-rest specificity and ROC AUC.
  95% intervals are percentile bootstraps over images (fixed seed, so a rerun gives the same interval).
* Calibration: ``ece`` is the expected calibration error of the top-class confidence (15 equal-width bins: the
  bin-weighted mean gap between confidence and accuracy); ``reliability`` lists 10 equal-width bins (count, mean
  confidence, accuracy) for a reliability diagram; ``roc_curves`` holds each class's one-vs-rest ROC points.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    matthews_corrcoef,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from .classes import CLASS_NAMES, class_index

if TYPE_CHECKING:
    from .records import ImageResult

EMPTY_MASK_RULE = (
    "both masks empty = 1.0; exactly one empty (missed lesion, or lesion predicted where there is none) = 0.0"
)


def dice_score(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient of two binary masks of the same shape (empty-mask rule in the module docstring)."""
    pred, truth = _binary_pair(pred, truth)
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, truth).sum()) / total


def iou_score(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union (Jaccard) of two binary masks of the same shape."""
    pred, truth = _binary_pair(pred, truth)
    union = int(np.logical_or(pred, truth).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(pred, truth).sum()) / union


def _binary_pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if pred.shape != truth.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {truth.shape}")
    return pred.astype(bool), truth.astype(bool)


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def segmentation_metrics(
    dice: Sequence[float], iou: Sequence[float], truth_has_lesion: Sequence[bool], pred_has_lesion: Sequence[bool]
) -> dict[str, Any]:
    """Summarise per-image Dice / IoU; see the module docstring for each key's definition."""
    dice_a, iou_a = np.asarray(dice, dtype=float), np.asarray(iou, dtype=float)
    truth_a, pred_a = np.asarray(truth_has_lesion, dtype=bool), np.asarray(pred_has_lesion, dtype=bool)
    empty = ~truth_a
    return {
        "n_images": int(dice_a.size),
        "n_with_lesion": int(truth_a.sum()),
        "dice_mean": _mean_or_none(dice_a[truth_a]),
        "iou_mean": _mean_or_none(iou_a[truth_a]),
        "dice_median": float(np.median(dice_a[truth_a])) if truth_a.any() else None,
        "dice_mean_all": _mean_or_none(dice_a),
        "iou_mean_all": _mean_or_none(iou_a),
        "false_positive_rate_normal": _mean_or_none(pred_a[empty].astype(float)),
        "n_without_lesion": int(empty.sum()),
        "empty_mask_rule": EMPTY_MASK_RULE,
    }


def metrics_json(
    true_classes: Sequence[int] = (),
    predicted_classes: Sequence[int] = (),
    probabilities: np.ndarray | None = None,
    dice: Sequence[float] = (),
    iou: Sequence[float] = (),
    truth_has_lesion: Sequence[bool] = (),
    pred_has_lesion: Sequence[bool] = (),
    class_names: Sequence[str] = CLASS_NAMES,
    n_boot: int = 1000,
) -> dict[str, Any] | None:
    """The content of ``metrics.json``, and its only builder (a run, a merge and training's evaluation).

    ``definitions`` (this module's docstring); ``classification`` of the labelled images (true and predicted
    class indices, class probabilities) when there are any; ``segmentation`` of the scored masks when there are
    any. None when there is neither.
    """
    if not len(true_classes) and not len(dice):
        return None
    result: dict[str, Any] = {"definitions": (__doc__ or "").strip()}
    if len(true_classes):
        result["classification"] = classification_metrics(
            true_classes, predicted_classes, probabilities, class_names, n_boot=n_boot
        )
    if len(dice):
        result["segmentation"] = segmentation_metrics(dice, iou, truth_has_lesion, pred_has_lesion)
    return result


def compute_metrics(rows: Sequence[ImageResult]) -> dict[str, Any] | None:
    """:func:`metrics_json` of ``predictions.csv`` rows: classification over the ``ok`` rows with a true class,
    segmentation over the ``ok`` rows with a Dice. Rows as the CSV holds them (``records.as_written``), so the
    result can always be recomputed from ``predictions.csv`` alone."""
    labelled = [r for r in rows if r.ok and r.true_class]
    segmented = [r for r in rows if r.ok and r.dice is not None]
    return metrics_json(
        true_classes=[class_index(r.true_class) for r in labelled],
        predicted_classes=[class_index(r.pred_class) for r in labelled],
        probabilities=np.array([[r.p_normal, r.p_benign, r.p_malignant] for r in labelled], dtype=float),
        dice=[r.dice for r in segmented],
        iou=[r.iou for r in segmented],
        truth_has_lesion=[(r.truth_area_px or 0) > 0 for r in segmented],
        pred_has_lesion=[(r.lesion_area_px or 0) > 0 for r in segmented],
    )


def specificity_per_class(cm: np.ndarray) -> np.ndarray:
    """One-vs-rest specificity TN / (TN + FP) for each class of a confusion matrix (rows = true)."""
    cm = np.asarray(cm, dtype=float)
    total = cm.sum()
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    tn = total - tp - fp - fn
    denom = tn + fp
    return np.divide(tn, denom, out=np.full_like(tn, np.nan), where=denom > 0)


def bootstrap_ci(
    statistic: Callable[[np.ndarray, np.ndarray], float],
    y_true: np.ndarray,
    y_pred: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(y_true, y_pred)`` resampling images with replacement."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    rng = np.random.default_rng(seed)
    n = y_true.size
    values = np.empty(n_boot)
    for b in range(n_boot):
        idx = rng.integers(0, n, n)
        values[b] = statistic(y_true[idx], y_pred[idx])
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1.0 - alpha))


def _mcc(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    # sklearn warns and returns 0 when a resample holds a single class; 0 is the defined value there.
    if np.unique(y_true).size < 2 and np.unique(y_pred).size < 2:
        return 0.0
    return float(matthews_corrcoef(y_true, y_pred))


def _accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(y_true == y_pred))


def classification_metrics(
    y_true: Sequence[int],
    y_pred: Sequence[int],
    probabilities: np.ndarray | None,
    class_names: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Classification summary for integer labels ``0..len(class_names)-1``.

    ``probabilities`` (n, k) enables one-vs-rest ROC AUC; a class absent from ``y_true`` gets ``None`` there.
    """
    yt, yp = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    labels = list(range(len(class_names)))
    if yt.size == 0:
        return {"n_images": 0}
    cm = confusion_matrix(yt, yp, labels=labels)
    precision, recall, f1, support = precision_recall_fscore_support(yt, yp, labels=labels, zero_division=0)
    p_w, r_w, f_w, _ = precision_recall_fscore_support(yt, yp, labels=labels, average="weighted", zero_division=0)
    specificity = specificity_per_class(cm)
    auc: dict[str, float | None] = {}
    for k, name in enumerate(class_names):
        positives = yt == k
        if probabilities is None or positives.all() or not positives.any():
            auc[name] = None
        else:
            auc[name] = float(roc_auc_score(positives, np.asarray(probabilities)[:, k]))
    per_class = {
        name: {
            "precision": float(precision[k]),
            "recall": float(recall[k]),
            "sensitivity": float(recall[k]),
            "specificity": None if np.isnan(specificity[k]) else float(specificity[k]),
            "f1": float(f1[k]),
            "support": int(support[k]),
        }
        for k, name in enumerate(class_names)
    }
    calibration: dict[str, Any] = {}
    if probabilities is not None:
        probs = np.asarray(probabilities, dtype=float)
        calibration = {
            "ece": expected_calibration_error(probs, yt),
            "ece_ci95": list(bootstrap_ci(lambda t, i: expected_calibration_error(probs[i], t), yt,
                                          np.arange(yt.size), n_boot=n_boot, seed=seed)),
            "reliability": reliability_bins(probs, yt),
            "roc_curves": roc_curves(yt, probs, class_names),
        }
    return {
        "n_images": int(yt.size),
        "class_order": list(class_names),
        "accuracy": float(accuracy_score(yt, yp)),
        "accuracy_ci95": list(bootstrap_ci(_accuracy, yt, yp, n_boot=n_boot, seed=seed)),
        "precision_weighted": float(p_w),
        "recall_weighted": float(r_w),
        "f1_weighted": float(f_w),
        "f1_macro": float(f1_score(yt, yp, labels=labels, average="macro", zero_division=0)),
        "mcc": _mcc(yt, yp),
        "mcc_ci95": list(bootstrap_ci(_mcc, yt, yp, n_boot=n_boot, seed=seed)),
        "confusion_matrix": cm.tolist(),
        "per_class": per_class,
        "roc_auc": auc,
        **calibration,
    }


def expected_calibration_error(probabilities: np.ndarray, y_true: Sequence[int], n_bins: int = 15) -> float:
    """ECE of the top-class confidence: the bin-weighted gap between confidence and accuracy."""
    probs = np.asarray(probabilities, dtype=float)
    yt = np.asarray(y_true, dtype=int)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == yt
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(confidence[in_bin].mean() - correct[in_bin].mean())
    return float(ece)


def reliability_bins(probabilities: np.ndarray, y_true: Sequence[int], n_bins: int = 10) -> list[dict[str, Any]]:
    """Equal-width bins of the top-class confidence: ``[{lo, hi, count, confidence, accuracy}]``; the last two
    are None for an empty bin. Plotting accuracy against confidence gives the reliability diagram."""
    probs = np.asarray(probabilities, dtype=float)
    yt = np.asarray(y_true, dtype=int)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == yt
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = []
    for k, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        in_bin = (confidence > lo) & (confidence <= hi) if k else (confidence >= lo) & (confidence <= hi)
        count = int(in_bin.sum())
        bins.append({
            "lo": float(lo), "hi": float(hi), "count": count,
            "confidence": float(confidence[in_bin].mean()) if count else None,
            "accuracy": float(correct[in_bin].mean()) if count else None,
        })
    return bins


def roc_curves(
    y_true: Sequence[int], probabilities: np.ndarray, class_names: Sequence[str]
) -> dict[str, dict[str, list[float]] | None]:
    """One-vs-rest ROC points per class (``fpr``, ``tpr``), None where the class is absent or alone."""
    yt = np.asarray(y_true, dtype=int)
    curves: dict[str, dict[str, list[float]] | None] = {}
    for k, name in enumerate(class_names):
        positives = yt == k
        if positives.all() or not positives.any():
            curves[name] = None
            continue
        fpr, tpr, _ = roc_curve(positives, np.asarray(probabilities, dtype=float)[:, k])
        curves[name] = {"fpr": [round(float(v), 5) for v in fpr], "tpr": [round(float(v), 5) for v in tpr]}
    return curves
