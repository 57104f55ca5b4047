"""How much the model's answers move when the burnt-in annotations (calipers, text, colour marks) are painted out.

BUSI frames carry what the sonographer drew on screen: "+" calipers at a lesion's edges, measurement text and a
few coloured marks. A model can learn those as a shortcut (calipers are drawn on lesions, never on normal
scans), which would not survive scanners or operators that draw differently. For every image of the chosen
folds this finds thin bright structures (white top-hat of the grey image above ``--contrast``, at least
``--bright`` bright) and coloured pixels, paints them out (OpenCV's Telea inpainting) and runs the model on both
versions. It reports how often the class changes, how far the class probabilities move, the Dice between the two
masks, and lesion Dice against the ground truth before and after.

    python benchmarks/annotation_sensitivity.py --weights busi_batch/weights/busi_unet_v4.pt --folds test
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # train/ is not installed; run from anywhere

from busi_batch.classes import CLASS_NAMES  # noqa: E402
from busi_batch.discover import ImageItem  # noqa: E402
from busi_batch.imageio import load_image  # noqa: E402
from busi_batch.inference import predict_images  # noqa: E402
from busi_batch.metrics import dice_score  # noqa: E402
from busi_batch.model import load_model  # noqa: E402
from busi_batch.postprocess import lesion_mask  # noqa: E402
from train.annotations import annotation_mask, painted_out  # noqa: E402
from train.evaluate import fold_items, load_split  # noqa: E402


def answers(loaded, items: list[ImageItem]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    rules = loaded.card.mask_rules()
    out = []
    for pred in predict_images(loaded, items, batch_size=16):
        top = CLASS_NAMES[int(np.argmax(pred.probabilities))]
        mask = lesion_mask(pred.lesion_probability, pred.height, pred.width, top, rules)
        out.append((pred.probabilities, mask, pred.truth_mask))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=None, help="checkpoint (default: the shipped default)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/busi"))
    parser.add_argument("--split", type=Path, default=Path("train/splits/busi_v1.csv"))
    parser.add_argument("--folds", nargs="+", default=["test"])
    parser.add_argument("--contrast", type=int, default=60, help="white top-hat threshold (grey levels)")
    parser.add_argument("--bright", type=int, default=200, help="minimum grey level of an annotation pixel")
    parser.add_argument("--out", type=Path, default=None, help="write the summary JSON here")
    args = parser.parse_args()

    loaded = load_model(args.weights)
    split = load_split(args.split)
    items = [item for fold in args.folds for item in fold_items(args.data, split, fold)]
    with tempfile.TemporaryDirectory() as tmp:
        cleaned_items, marked = [], []
        for k, item in enumerate(items):
            image = load_image(item.path)
            marks = annotation_mask(image, args.contrast, args.bright)
            marked.append(float(marks.mean()))
            path = Path(tmp) / f"{k:05d}.png"
            cv2.imwrite(str(path), painted_out(image, marks))
            cleaned_items.append(ImageItem(path=path, rel=path.name, true_class=item.true_class,
                                           truth_masks=item.truth_masks))
        before, after = answers(loaded, items), answers(loaded, cleaned_items)

    flips = [int(np.argmax(a[0]) != np.argmax(b[0])) for a, b in zip(before, after)]
    moved = [float(np.abs(a[0] - b[0]).max()) for a, b in zip(before, after)]
    agreement = [dice_score(a[1], b[1]) for a, b in zip(before, after)]
    lesion = [i for i, (_, _, truth) in enumerate(before) if truth is not None and truth.any()]
    summary = {
        "weights": str(loaded.weights_path), "weights_sha256": loaded.sha256, "folds": args.folds,
        "n_images": len(items),
        "images_with_annotations": int(sum(m > 0 for m in marked)),
        "annotation_pixels_mean_share": float(np.mean(marked)),
        "class_changed": int(sum(flips)), "class_changed_share": float(np.mean(flips)),
        "max_probability_change_mean": float(np.mean(moved)),
        "max_probability_change_p95": float(np.quantile(moved, 0.95)),
        "mask_dice_original_vs_painted_mean": float(np.mean(agreement)),
        "lesion_dice_vs_truth_original": float(np.mean([dice_score(before[i][1], before[i][2]) for i in lesion])),
        "lesion_dice_vs_truth_painted": float(np.mean([dice_score(after[i][1], after[i][2]) for i in lesion])),
        "accuracy_original": float(np.mean([np.argmax(b[0]) == CLASS_NAMES.index(it.true_class)
                                            for b, it in zip(before, items)])),
        "accuracy_painted": float(np.mean([np.argmax(a[0]) == CLASS_NAMES.index(it.true_class)
                                           for a, it in zip(after, items)])),
    }
    text = json.dumps(summary, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
