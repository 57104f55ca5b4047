"""How far bf16 moves the shipped model's answers from fp32, on real BUSI images (not the test fold alone).

For every image of the chosen folds of the split: does the predicted class agree, how far apart are the class
probabilities, and what is the Dice between the two final masks (after the model card's mask rules)?
This is the measurement behind ``--precision auto`` choosing bf16 on CPUs with AMX / AVX512-BF16.

    python benchmarks/precision_agreement.py [--data ../shared/data/busi] [--folds test 0 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # train/ is not installed; run from anywhere

from busi_batch.classes import CLASS_NAMES  # noqa: E402
from busi_batch.inference import predict_images  # noqa: E402
from busi_batch.metrics import dice_score  # noqa: E402
from busi_batch.model import load_model  # noqa: E402
from busi_batch.postprocess import lesion_mask  # noqa: E402
from train.evaluate import fold_items, load_split  # noqa: E402


def answers(precision: str, items: list, weights: Path | None) -> list[tuple[np.ndarray, np.ndarray]]:
    loaded = load_model(weights, precision=precision)
    rules = loaded.card.mask_rules()
    out = []
    for pred in predict_images(loaded, items, batch_size=16, workers=2, with_truth=False):
        top = CLASS_NAMES[int(np.argmax(pred.probabilities))]
        out.append((pred.probabilities, lesion_mask(pred.lesion_probability, pred.height, pred.width, top, rules)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/busi"))
    parser.add_argument("--split", type=Path, default=Path("train/splits/busi_v1.csv"))
    parser.add_argument("--folds", nargs="+", default=["test", "0", "1"])
    parser.add_argument("--weights", type=Path, default=None)
    args = parser.parse_args()
    split = load_split(args.split)
    items = [item for fold in args.folds for item in fold_items(args.data, split, fold)]
    full, half = answers("fp32", items, args.weights), answers("bf16", items, args.weights)
    same_class = np.mean([np.argmax(a[0]) == np.argmax(b[0]) for a, b in zip(full, half)])
    prob_gap = max(float(np.abs(a[0] - b[0]).max()) for a, b in zip(full, half))
    dices = [dice_score(a[1], b[1]) for a, b in zip(full, half)]
    print(f"images: {len(items)} (folds {', '.join(args.folds)})")
    print(f"same class: {same_class:.2%}   largest class-probability gap: {prob_gap:.4f}")
    print(f"mask Dice fp32 vs bf16: mean {np.mean(dices):.4f}, min {np.min(dices):.4f}")


if __name__ == "__main__":
    main()
