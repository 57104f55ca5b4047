"""A prediction becomes a row of ``predictions.csv`` (:class:`~busi_batch.records.ImageResult`); a predicted mask
is scored against its ground truth.

Pure functions: nothing here reads or writes a file. ``busi-batch run``, ``bench`` and ``demo`` build their rows
with :func:`result_from_prediction`, and every Dice and IoU busi-batch reports, training's evaluation included,
comes from :func:`score_masks` (the maths and the empty-mask rule are :mod:`busi_batch.metrics`').

Rows are frozen: a row with other values is a new row (:func:`dataclasses.replace`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, NamedTuple

import numpy as np

from . import metrics
from .classes import CLASS_NAMES
from .dicom import Calibration, PixelSize, patient_columns, resolve_pixel_size
from .discover import ImageItem
from .inference import Prediction
from .model import LoadedModel
from .postprocess import lesion_area, lesion_count, lesion_mask
from .records import STATUS_ERROR, STATUS_OK, ImageResult


class MaskScores(NamedTuple):
    """A predicted mask against its ground truth."""

    dice: float
    iou: float
    truth_area_px: int
    predicted_area_px: int

    @property
    def truth_has_lesion(self) -> bool:
        return self.truth_area_px > 0

    @property
    def predicted_has_lesion(self) -> bool:
        return self.predicted_area_px > 0


def score_masks(pred: np.ndarray, truth: np.ndarray) -> MaskScores:
    """Dice, IoU and both lesion areas of two binary masks of the same shape (ValueError otherwise).

    Empty-mask rule (:data:`busi_batch.metrics.EMPTY_MASK_RULE`): both empty scores 1.0, exactly one empty 0.0.

    >>> truth = np.zeros((4, 4), bool); truth[:, 1:3] = True
    >>> score_masks(truth, truth)
    MaskScores(dice=1.0, iou=1.0, truth_area_px=8, predicted_area_px=8)
    >>> score_masks(np.zeros((4, 4), bool), truth).dice
    0.0
    """
    return MaskScores(
        dice=metrics.dice_score(pred, truth), iou=metrics.iou_score(pred, truth),
        truth_area_px=lesion_area(truth), predicted_area_px=lesion_area(pred),
    )


def settings_key(loaded: LoadedModel, tta: bool) -> str:
    """What besides input and model changes a result: part of the resume check.

    bf16 is named (its masks differ from fp32's in a few edge pixels); fp32 is not, so keys written before
    the precision option existed still match. A card's operating point (``class_bias``) is named when it has one:
    the same weights under another card give other classes.
    """
    key = f"{loaded.card.mask_rules().key()};tta={int(tta)}"
    key += (";precision=bf16" if loaded.precision == "bf16" else "")
    operating_point = loaded.card.operating_point_key()
    return key + (f";{operating_point}" if operating_point else "")


def identifier_columns(item: ImageItem, anonymize: bool) -> dict[str, Any]:
    """The DICOM columns of an item's row: frame and UIDs always (the join keys), patient ID and study date only
    without ``--anonymize``. Empty for other files."""
    header = item.dicom
    if header is None:
        return {"frame": item.frame}
    ids = header.identifiers
    return {
        "frame": item.frame, "study_uid": ids.study_uid, "series_uid": ids.series_uid, "sop_uid": ids.sop_uid,
        **patient_columns(header.patient, anonymize),
    }


def pixel_size_columns(size: PixelSize, area_px: int | None) -> dict[str, Any]:
    """``pixel_size_mm_x/y``, ``pixel_size_source`` and ``lesion_area_mm2`` of a row from its pixel size."""
    return {
        "pixel_size_mm_x": size.x_mm, "pixel_size_mm_y": size.y_mm, "pixel_size_source": size.source,
        "lesion_area_mm2": size.area_mm2(area_px) if area_px is not None else None,
    }


def _calibration(item: ImageItem) -> Calibration | None:
    return item.dicom.calibration if item.dicom is not None else None


def error_row(
    item: ImageItem, error: str, input_sha256: str, model_sha256: str, settings: str, anonymize: bool = False,
) -> ImageResult:
    """The row of an image that has no result: its reason, the hashes and settings, the identifier columns."""
    return ImageResult(image=item.name, status=STATUS_ERROR, error=error, input_sha256=input_sha256,
                       model_sha256=model_sha256, settings=settings, **identifier_columns(item, anonymize))


def result_from_prediction(
    item: ImageItem, pred: Prediction, loaded: LoadedModel, mask_rel: str, settings: str,
    pixel_size_mm: float | None, anonymize: bool = False,
) -> tuple[ImageResult, np.ndarray | None]:
    """The CSV row and the full-size binary mask for one prediction (None for an image that has no result).

    The physical pixel size is chosen with the mask at the image's own size: a DICOM object's ultrasound region
    is the one holding the lesion (see ``dicom``); ``pixel_size_mm`` only for inputs without calibration.
    """
    if pred.error is not None:
        return error_row(item, pred.error, pred.input_sha256, loaded.sha256, settings, anonymize), None
    probs = pred.probabilities
    top = int(np.argmax(probs))
    mask = lesion_mask(pred.lesion_probability, pred.height, pred.width, CLASS_NAMES[top], loaded.card.mask_rules())
    area = lesion_area(mask)
    row = ImageResult(
        image=item.name,
        status=STATUS_OK,
        pred_class=CLASS_NAMES[top],
        confidence=float(probs[top]),
        p_normal=float(probs[0]),
        p_benign=float(probs[1]),
        p_malignant=float(probs[2]),
        lesion_area_px=area,
        **pixel_size_columns(resolve_pixel_size(_calibration(item), mask, pixel_size_mm), area),
        lesion_count=lesion_count(mask),
        mask=mask_rel,
        width=pred.width,
        height=pred.height,
        input_sha256=pred.input_sha256,
        model_sha256=loaded.sha256,
        settings=settings,
        **identifier_columns(item, anonymize),
    )
    return row, mask


def with_truth(
    row: ImageResult, item: ImageItem, predicted: np.ndarray | None = None, truth: np.ndarray | None = None,
    truth_error: str = "",
) -> ImageResult:
    """The row with the item's ground truth: ``true_class``; and for an ``ok`` row of an item with truth masks,
    ``dice``, ``iou`` and ``truth_area_px`` of ``predicted`` against ``truth``, or, when either is None,
    ``truth_error`` (why the truth could not be used). Earlier values of these columns are replaced."""
    row = replace(row, true_class=item.true_class or "", dice=None, iou=None, truth_area_px=None, truth_error="")
    if not (row.ok and item.truth_masks):
        return row
    if predicted is None or truth is None:
        return replace(row, truth_error=truth_error)
    scores = score_masks(predicted, truth)
    return replace(row, dice=scores.dice, iou=scores.iou, truth_area_px=scores.truth_area_px)


def refresh_kept(row: ImageResult, item: ImageItem, pixel_size_mm: float | None, anonymize: bool) -> ImageResult:
    """A row kept from an earlier run, brought up to this run's options without redoing the image.

    A DICOM object with any calibration keeps its pixel size (it depends only on the file and the mask, both
    unchanged); any other input takes this run's ``--pixel-size`` (given, changed or dropped). The identifier
    columns follow ``--anonymize``.
    """
    calibration = _calibration(item)
    if calibration is None or not calibration.calibrated:
        row = replace(row, **pixel_size_columns(resolve_pixel_size(calibration, None, pixel_size_mm),
                                                row.lesion_area_px))
    return replace(row, **identifier_columns(item, anonymize))
