"""Choose a checkpoint's mask rules (threshold, speck removal, no mask on a *normal* verdict) on the validation fold.

The network's lesion probability is only half of the reported mask: how it is thresholded and cleaned decides
Dice as much as the weights do, above all on normal images, where any outline at all scores 0 under the metric's
empty-mask rule. The rules are chosen here, on the validation fold only (never on test), by mean per-image Dice over
*all* images (``dice_mean_all``: lesion images and lesion-free ones, which count 1 only when left empty) at native
resolution through the production path (``busi_batch.inference.predict`` +
``busi_batch.postprocess.lesion_mask``), and stored in the model card by ``train.export``.

The grid is deliberately small (threshold x minimum component size x normal rule): ~125 validation images cannot
support a finer search without fitting their noise. Among rules within ``TIE`` of the best Dice the simplest wins
(plain rules before added ones, threshold nearest 0.5).

    python -m train.tune_mask --weights busi_batch/weights/busi_unet_v1.pt --fold 0
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from busi_batch.discover import ImageItem
from busi_batch.inference import Prediction, predict_images
from busi_batch.model import LoadedModel, load_model
from busi_batch.postprocess import MaskRules

from .evaluate import checkpoint_parser, fold_items, score_prediction, segmentation_summary
from .split import load_split

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
MIN_COMPONENT_FRACTIONS = (0.0, 0.0005, 0.001, 0.0025, 0.005, 0.01)
#: Rules whose validation Dice is within this of the best count as equally good; the simplest of them is chosen.
TIE = 0.003


@dataclass
class RuleScore:
    rules: MaskRules
    dice_all: float  # the criterion: every image, empty-mask rule
    dice: float  # lesion images only (the headline ``dice_mean``)
    false_positive_rate_normal: float | None


def candidate_rules(letterbox: bool = False) -> list[MaskRules]:
    """The grid, for probability maps of a letterboxed (or squashed) input."""
    return [MaskRules(t, m, e, letterbox)
            for t, m, e in itertools.product(THRESHOLDS, MIN_COMPONENT_FRACTIONS, (False, True))]


def score_rules(predictions: list[tuple[ImageItem, Prediction]], rules: MaskRules) -> RuleScore:
    """Mean per-image Dice under ``rules``, over all images and over lesion images (``train.evaluate``'s scoring)."""
    seg = segmentation_summary([score_prediction(item, pred, rules) for item, pred in predictions])
    return RuleScore(rules, seg["dice_mean_all"], seg["dice_mean"], seg["false_positive_rate_normal"])


def complexity(rules: MaskRules) -> tuple[int, float, float]:
    """Smaller is simpler: fewer extra rules, then threshold nearer 0.5, then smaller speck size."""
    extras = int(rules.empty_when_normal) + int(rules.min_component_fraction > 0)
    return extras, abs(rules.threshold - 0.5), rules.min_component_fraction


def choose(scores: list[RuleScore], tie: float = TIE) -> RuleScore:
    """The simplest rules whose all-image Dice is within ``tie`` of the best."""
    best = max(s.dice_all for s in scores)
    return min((s for s in scores if s.dice_all >= best - tie), key=lambda s: complexity(s.rules))


def tune(loaded: LoadedModel, data: Path, split_path: Path, fold: str, workers: int = 0) -> dict[str, Any]:
    """Score every candidate on validation fold ``fold``; returns the chosen rules, the default's score, the grid."""
    items = fold_items(Path(data), load_split(split_path), fold)
    preds = [(items[pred.index], pred) for pred in predict_images(loaded, items, workers=workers)]
    letterbox = loaded.card.input_geometry == "letterbox"
    scores = [score_rules(preds, rules) for rules in candidate_rules(letterbox)]
    chosen = choose(scores)
    default = next(s for s in scores if s.rules == MaskRules(letterbox=letterbox))
    return {
        "fold": fold,
        "n_images": len(preds),
        "criterion": f"mean per-image Dice over all images (dice_mean_all) at native resolution; simplest rules "
                     f"within {TIE} of the best",
        "chosen": row(chosen),
        "default": row(default),
        "grid": [row(s) for s in scores],
    }


def row(score: RuleScore) -> dict[str, Any]:
    """A JSON-ready record of one rule set and its scores."""
    fpr = score.false_positive_rate_normal
    return {**asdict(score.rules), "dice_mean_all": round(score.dice_all, 4), "dice_mean": round(score.dice, 4),
            "false_positive_rate_normal": None if fpr is None else round(fpr, 4)}


def main(argv: list[str] | None = None) -> None:
    parser = checkpoint_parser(__doc__)
    parser.add_argument("--fold", default="0", help="validation fold (never 'test')")
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args(argv)
    if args.fold == "test":
        parser.error("mask rules are chosen on a validation fold, never on the test portion")
    result = tune(load_model(args.weights), args.data, args.split, args.fold, args.workers)
    for row in sorted(result["grid"], key=lambda r: -r["dice_mean_all"])[:10]:
        print(row)
    print("default:", result["default"])
    print("chosen: ", result["chosen"])


if __name__ == "__main__":
    main()
