"""Held-out test metrics of a checkpoint, at each image's native resolution, through the production path.

Images go through ``busi_batch.inference.predict`` (decode -> preprocess -> forward, temperature applied), the
lesion probability becomes a mask at the image's own size under the card's mask rules
(``busi_batch.postprocess.lesion_mask``), scored with ``busi_batch.rows.score_masks`` and summarised by
``busi_batch.metrics.metrics_json``: the numbers are what ``busi-batch run`` would report on the same images, not
cache-resolution proxies.

Reported on the split's ``test`` fold, and on the test images that are also in the curated, redundancy-free
subset of Aumente-Maestro et al. (``curated_subset_aumente2024.csv``), key ``curated_subset``.

    python -m train.evaluate --weights busi_batch/weights/busi_unet_v1.pt --data ../shared/data/busi \
        --split train/splits/busi_v1.csv [--tta] [--out metrics.json]
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from busi_batch import metrics
from busi_batch.classes import CLASS_NAMES, class_index
from busi_batch.discover import ImageItem, discover
from busi_batch.imageio import atomic_write_text
from busi_batch.inference import Prediction, predict_images
from busi_batch.model import FORWARD_PRECISIONS, LoadedModel, default_weights_path, load_model, sha256_file
from busi_batch.postprocess import MaskRules, lesion_mask
from busi_batch.rows import score_masks

from .split import TEST, load_split

_NUMBER = re.compile(r"\((\d+)\)")


@dataclass
class ImageScore:
    """What the metrics need from one image."""

    rel: str
    true_class: int
    probabilities: np.ndarray
    dice: float
    iou: float
    truth_has_lesion: bool
    pred_has_lesion: bool


def score_prediction(item: ImageItem, pred: Prediction, rules: MaskRules) -> ImageScore:
    """Full-size binary mask from the prediction, compared with the item's ground truth (the CLI's rule)."""
    if pred.error is not None or pred.truth_mask is None:
        raise RuntimeError(f"{item.rel}: {pred.error or pred.truth_error or 'no ground-truth mask'}")
    predicted = CLASS_NAMES[int(np.argmax(pred.probabilities))]
    mask = lesion_mask(pred.lesion_probability, pred.height, pred.width, predicted, rules)
    scores = score_masks(mask, pred.truth_mask)
    return ImageScore(
        rel=item.rel,
        true_class=class_index(item.true_class or ""),
        probabilities=np.asarray(pred.probabilities, dtype=float),
        dice=scores.dice,
        iou=scores.iou,
        truth_has_lesion=scores.truth_has_lesion,
        pred_has_lesion=scores.predicted_has_lesion,
    )


def score_items(
    loaded: LoadedModel, items: list[ImageItem], tta: bool = False, batch_size: int = 16, workers: int = 0
) -> list[ImageScore]:
    rules = loaded.card.mask_rules()
    preds = predict_images(loaded, items, batch_size=batch_size, workers=workers, tta=tta)
    return [score_prediction(items[p.index], p, rules) for p in preds]


def summarise(scores: list[ImageScore], n_boot: int = 1000) -> dict[str, Any]:
    """``metrics.json`` of the scored images, built as ``busi-batch run`` builds it (``metrics.metrics_json``):
    definitions, classification, segmentation."""
    probs = np.stack([s.probabilities for s in scores])
    return metrics.metrics_json(
        true_classes=[s.true_class for s in scores], predicted_classes=probs.argmax(axis=1).tolist(),
        probabilities=probs, n_boot=n_boot, **_segmentation_inputs(scores),
    )


def segmentation_summary(scores: list[ImageScore]) -> dict[str, Any]:
    """``metrics.segmentation_metrics`` of scored images (the ``segmentation`` block of ``metrics.json``)."""
    return metrics.segmentation_metrics(**_segmentation_inputs(scores))


def _segmentation_inputs(scores: list[ImageScore]) -> dict[str, list[Any]]:
    return {
        "dice": [s.dice for s in scores], "iou": [s.iou for s in scores],
        "truth_has_lesion": [s.truth_has_lesion for s in scores],
        "pred_has_lesion": [s.pred_has_lesion for s in scores],
    }


def curated_names(csv_path: Path) -> set[str]:
    """``class/class (id).png`` for every row of ``curated_subset_aumente2024.csv`` (``;``-separated class;id)."""
    table = pd.read_csv(csv_path, sep=";", dtype=str)
    return {f"{c.strip()}/{c.strip()} ({int(i)}).png" for c, i in zip(table["class"], table["id"])}


def fold_items(data: Path, split: pd.DataFrame, fold: str = TEST) -> list[ImageItem]:
    """The discovered images of one split fold (``test`` or "0".."4"); every row of it must exist on disk."""
    wanted = set(split.loc[split["fold"] == fold, "image"])
    items = [item for item in discover(data).items if item.rel in wanted]
    missing = wanted - {item.rel for item in items}
    if missing:
        raise FileNotFoundError(f"{len(missing)} {fold} images not found under {data} (first: {sorted(missing)[0]})")
    return items


def evaluate(
    weights: Path, data: Path, split_path: Path, tta: bool = False, n_boot: int = 1000, workers: int = 0,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Metrics on the test fold, plus ``curated_subset`` and an ``evaluation`` block saying what was measured.

    ``precision`` fp32 by default: the model card's numbers are measured in full precision, on any hardware.
    """
    loaded = load_model(weights, precision=precision)
    split = load_split(split_path)
    items = fold_items(Path(data), split, TEST)
    scores = score_items(loaded, items, tta=tta, workers=workers)
    result = summarise(scores, n_boot)
    curated_csv = Path(data) / "curated_subset_aumente2024.csv"
    if curated_csv.is_file():
        keep = curated_names(curated_csv)
        curated = [s for s in scores if s.rel in keep]
        if curated:
            result["curated_subset"] = summarise(curated, n_boot)
    result["evaluation"] = {
        "portion": "test fold of the split (never used for training, model selection or calibration)",
        "split_file": split_path.name,
        "split_sha256": sha256_file(split_path),
        "weights_sha256": loaded.sha256,
        "resolution": "native (lesion probability resized to each image, mask by the card's mask rules)",
        "threshold": loaded.card.threshold,
        "mask_rules": loaded.card.mask_rules().key(),
        "temperature": loaded.card.temperature,
        "class_bias": list(loaded.card.class_bias),
        "tta": tta,
        "precision": precision,
    }
    return result


def table(result: dict[str, Any]) -> str:
    """A compact console table: one line per evaluated portion."""
    columns = ("dice", "iou", "acc", "f1w", "mcc", "sens_m", "fpr_n")
    lines = [f"{'portion':16s} {'n':>4s} " + " ".join(f"{c:>6s}" for c in columns)]
    for name, block in (("test", result), ("curated_subset", result.get("curated_subset"))):
        if not block:
            continue
        c, s = block["classification"], block["segmentation"]
        fpr = s["false_positive_rate_normal"]
        lines.append(
            f"{name:16s} {c['n_images']:4d} {s['dice_mean']:6.3f} {s['iou_mean']:6.3f} {c['accuracy']:6.3f} "
            f"{c['f1_weighted']:6.3f} {c['mcc']:6.3f} {c['per_class']['malignant']['sensitivity']:6.3f} "
            f"{'  n/a' if fpr is None else f'{fpr:6.3f}'}"
        )
    return "\n".join(lines)


def checkpoint_parser(description: str | None) -> argparse.ArgumentParser:
    """Command-line options shared by the tools that score a checkpoint on BUSI: weights, data folder, split."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=default_weights_path(),
                        help="checkpoint (default: the shipped default model)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/busi"))
    parser.add_argument("--split", type=Path, default=Path("train/splits/busi_v1.csv"))
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = checkpoint_parser(__doc__)
    parser.add_argument("--tta", action="store_true", help="also run the horizontally flipped image")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--precision", choices=FORWARD_PRECISIONS, default="fp32",
                        help="forward pass precision (the model card's numbers: fp32)")
    parser.add_argument("--out", type=Path, default=None, help="write the metrics JSON here")
    args = parser.parse_args(argv)
    result = evaluate(args.weights, args.data, args.split, tta=args.tta, workers=args.workers,
                      precision=args.precision)
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
