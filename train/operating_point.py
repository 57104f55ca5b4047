"""Would a class operating point help? Additive biases on the calibrated class logits, judged out of fold.

A network's argmax is one operating point among many: adding ``b = (b_normal, 0, b_malignant)`` to the
temperature-scaled class logits trades benign calls for malignant (or normal) ones. The project asks for
malignant sensitivity >= 0.88, so the natural choice is the point with the best MCC among those that reach it.
Whether such a point *transfers* to unseen images is the question, and it is answered without the test
portion: for each cross-validation fold K the point is chosen on the other folds' out-of-fold predictions and
scored on fold K (nested), then pooled over the folds against b = 0.

Because the mask rules drop the mask of an image called *normal*, moving verdicts away from normal also outlines
more lesion-free images; that rate is reported beside MCC and malignant sensitivity.

    python -m train.operating_point study --cv train/runs/busi_unet_v5/cv_seed1234 train/runs/busi_unet_v5/cv
    python -m train.operating_point apply --cv train/runs/busi_unet_v5/cv --weights busi_batch/weights/busi_unet_v5.pt

Each ``--cv`` folder is a :mod:`train.cv` or :mod:`train.ensemble` output: ``fold{K}/checkpoint.pt`` (the fold's
uncalibrated network) and ``cv_summary.json`` (its temperature and mask rules). ``apply`` writes the point
chosen on all of that folder's out-of-fold predictions into the card of the checkpoint exported from the same
recipe, only where the nested estimate passes :func:`adopt`, and scores the test portion once with it (the
weights file is not touched).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import matthews_corrcoef

from busi_batch.classes import CLASS_NAMES
from busi_batch.imageio import atomic_write_text
from busi_batch.inference import predict_images
from busi_batch.model import ModelCard, card_path_for, load_model, sha256_file
from busi_batch.postprocess import MaskRules, lesion_mask

from . import evaluate as evaluation
from .cv import load_summary
from .evaluate import fold_items
from .fit import load_config, tune_runtime
from .split import load_split

#: Candidate biases for normal and for malignant (benign's stays 0: only differences between logits matter).
GRID: tuple[float, ...] = tuple(float(v) for v in np.round(np.arange(-1.0, 1.0001, 0.25), 2))
TARGET_MALIGNANT_SENSITIVITY = 0.88
NORMAL, BENIGN, MALIGNANT = (CLASS_NAMES.index(c) for c in ("normal", "benign", "malignant"))


@dataclass(frozen=True)
class OutOfFold:
    """Pooled out-of-fold predictions of one recipe: per image its fold, true class index, calibrated class
    log-probabilities (N, 3) and whether its mask would be non-empty were it called benign or malignant."""

    fold: np.ndarray
    truth: np.ndarray
    log_probs: np.ndarray
    outline_if_lesion: np.ndarray

    def subset(self, keep: np.ndarray) -> OutOfFold:
        return OutOfFold(self.fold[keep], self.truth[keep], self.log_probs[keep], self.outline_if_lesion[keep])


def decide(log_probs: np.ndarray, bias: tuple[float, float]) -> np.ndarray:
    """Class indices under ``bias = (b_normal, b_malignant)`` added to the log-probabilities."""
    shifted = log_probs.copy()
    shifted[:, NORMAL] += bias[0]
    shifted[:, MALIGNANT] += bias[1]
    return shifted.argmax(axis=1)


def scores(truth: np.ndarray, decided: np.ndarray, outline_if_lesion: np.ndarray) -> dict[str, float]:
    """MCC, accuracy, malignant sensitivity and the share of truly normal images given an outline."""
    malignant, normal = truth == MALIGNANT, truth == NORMAL
    outlined = outline_if_lesion & (decided != NORMAL)
    return {
        "mcc": float(matthews_corrcoef(truth, decided)),
        "accuracy": float(np.mean(decided == truth)),
        "malignant_sensitivity": float(np.mean(decided[malignant] == MALIGNANT)) if malignant.any() else float("nan"),
        "outline_lesion_free": float(np.mean(outlined[normal])) if normal.any() else float("nan"),
    }


def choose_bias(oof: OutOfFold, grid: tuple[float, ...] = GRID,
                target: float = TARGET_MALIGNANT_SENSITIVITY) -> tuple[float, float]:
    """The grid point with the best MCC among those reaching ``target`` malignant sensitivity; when none does,
    the one with the highest sensitivity. Ties go to the better MCC, then to the smaller total |bias|."""
    best_key, best = None, (0.0, 0.0)
    for b_normal in grid:
        for b_malignant in grid:
            s = scores(oof.truth, decide(oof.log_probs, (b_normal, b_malignant)), oof.outline_if_lesion)
            reached = s["malignant_sensitivity"] >= target
            key = (reached, s["mcc"] if reached else s["malignant_sensitivity"], s["mcc"],
                   -(abs(b_normal) + abs(b_malignant)))
            if best_key is None or key > best_key:
                best_key, best = key, (b_normal, b_malignant)
    return best


def nested(oof: OutOfFold) -> dict[str, Any]:
    """Choose on every fold but K, apply to K, for each K; pooled held-out scores with and without the bias."""
    decided = np.empty_like(oof.truth)
    chosen = {}
    for fold in sorted(set(oof.fold)):
        held = oof.fold == fold
        bias = choose_bias(oof.subset(~held))
        chosen[str(fold)] = bias
        decided[held] = decide(oof.log_probs[held], bias)
    plain = decide(oof.log_probs, (0.0, 0.0))
    return {"chosen": chosen, "with_bias": scores(oof.truth, decided, oof.outline_if_lesion),
            "without": scores(oof.truth, plain, oof.outline_if_lesion)}


def adopt(result: dict[str, Any]) -> bool:
    """The rule fixed before the study: malignant sensitivity +0.03 or more, MCC -0.01 at most, outlines on
    lesion-free images +0.03 at most (held-out pooled, against no bias)."""
    w, wo = result["with_bias"], result["without"]
    return (w["malignant_sensitivity"] - wo["malignant_sensitivity"] >= 0.03 and w["mcc"] - wo["mcc"] >= -0.01
            and w["outline_lesion_free"] - wo["outline_lesion_free"] <= 0.03)


def cv_config(cv: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """The recipe config of a CV folder: a train.cv fold folder holds its run's; an ensemble's folds hold only
    the combined checkpoint, so its first member's."""
    run_root = Path(summary["members"][0]) if "members" in summary else cv
    return load_config(run_root / f"fold{summary['folds'][0]}" / "config.yaml")


def collect(cv: Path) -> OutOfFold:
    """Predict each fold of a CV folder with its fold checkpoint through the production path."""
    summary = load_summary(cv)
    temperature = float(summary["temperature"]["temperature"])
    chosen = summary["mask_rules"]["chosen"]
    rules = MaskRules(chosen["threshold"], chosen["min_component_fraction"], chosen["empty_when_normal"],
                      chosen["letterbox"])
    config = cv_config(cv, summary)
    data, split = Path(config["data"]), load_split(Path(config["split"]))
    folds, truth, log_probs, outline = [], [], [], []
    for fold in summary["folds"]:
        items = fold_items(data, split, fold)
        loaded = load_model(cv / f"fold{fold}" / "checkpoint.pt")
        for prediction in predict_images(loaded, items):
            item = items[prediction.index]
            logits = np.log(np.clip(prediction.probabilities, 1e-12, None)) / temperature
            folds.append(fold)
            truth.append(CLASS_NAMES.index(item.true_class))
            log_probs.append(logits - np.logaddexp.reduce(logits))
            outline.append(bool(lesion_mask(prediction.lesion_probability, prediction.height, prediction.width,
                                            "benign", rules).any()))
    return OutOfFold(np.array(folds), np.array(truth), np.array(log_probs), np.array(outline))


def study(cv: Path) -> dict[str, Any]:
    """The nested estimate for one CV folder, the point all its folds would choose, and the rule's verdict."""
    oof = collect(cv)
    result = nested(oof)
    result["all_folds_choice"] = choose_bias(oof)
    result["adopt"] = adopt(result)
    result["n_images"] = int(len(oof.truth))
    return result


def apply(weights: Path, cv: Path, data: Path, split: Path, enforce_rule: bool = True,
          n_boot: int = 1000) -> ModelCard:
    """Give the checkpoint ``weights`` the operating point chosen on every fold of ``cv``; re-score test once.

    Raises ValueError when the nested estimate fails the rule (unless ``enforce_rule`` is off: tests only).
    """
    result = study(cv)
    if enforce_rule and not result["adopt"]:
        raise ValueError(f"{cv}: the nested estimate fails the adoption rule: {result['with_bias']} against "
                         f"{result['without']}")
    b_normal, b_malignant = result["all_folds_choice"]
    bias = [0.0] * len(CLASS_NAMES)
    bias[NORMAL], bias[MALIGNANT] = b_normal, b_malignant
    card = load_model(weights).card
    record = {"chosen_on": f"all {result['n_images']} out-of-fold predictions of {cv.as_posix()}",
              "criterion": f"best MCC with malignant sensitivity >= {TARGET_MALIGNANT_SENSITIVITY}",
              "grid": list(GRID), "nested_estimate": {k: result[k] for k in ("chosen", "with_bias", "without")},
              "command": f"python -m train.operating_point apply --cv {cv.as_posix()} --weights {weights.as_posix()}"}
    card = dataclasses.replace(card, class_bias=bias, extra={**card.extra, "operating_point": record})
    atomic_write_text(card_path_for(weights), card.to_json())
    metrics = evaluation.evaluate(weights, data, split, n_boot=n_boot)
    print(evaluation.table(metrics))
    card = dataclasses.replace(card, metrics=metrics)
    atomic_write_text(card_path_for(weights), card.to_json())
    assert sha256_file(weights) == card.weights_sha256
    return card


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    study_parser = commands.add_parser("study", help="nested out-of-fold estimate for each CV folder")
    study_parser.add_argument("--cv", type=Path, nargs="+", required=True, help="train.cv / train.ensemble folders")
    study_parser.add_argument("--out", type=Path, help="write the results as JSON here")
    apply_parser = commands.add_parser("apply", help="write the chosen point into a checkpoint's card")
    apply_parser.add_argument("--cv", type=Path, required=True)
    apply_parser.add_argument("--weights", type=Path, required=True)
    args = parser.parse_args(argv)
    tune_runtime(2)
    if args.command == "apply":
        config = cv_config(args.cv, load_summary(args.cv))
        card = apply(args.weights, args.cv, Path(config["data"]), Path(config["split"]))
        print(f"{args.weights}: class_bias {card.class_bias}")
        return
    results = {}
    for cv in args.cv:
        result = results[cv.as_posix()] = study(cv)
        print(f"{cv}: chosen per held-out fold {result['chosen']}; on all folds {result['all_folds_choice']}; "
              f"adopt: {result['adopt']}")
        for label in ("without", "with_bias"):
            s = result[label]
            print(f"  {label:10s} mcc {s['mcc']:.3f}  acc {s['accuracy']:.3f}  malignant sens. "
                  f"{s['malignant_sensitivity']:.3f}  outline on lesion-free {s['outline_lesion_free']:.3f}")
    if args.out:
        atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
