"""Cross-validation of one fixed recipe over the non-test folds, and what is chosen from its out-of-fold answers.

For each fold K in ``--folds`` the recipe trains on the other four non-test folds (``train.fit --val-fold K``, the
whole planned schedule: no epoch is picked by its validation score) and its final EMA weights predict fold K at
native resolution through the production path. The pooled out-of-fold (OOF) predictions then fix, without ever
reading the test portion:

* the temperature of the class logits (NLL on the OOF logits, :func:`train.calibrate.fit_temperature`);
* the mask rules (threshold, speck removal, no mask on a *normal* verdict; :func:`train.tune_mask.choose` on
  OOF Dice over all images).

Each fold is then scored under those choices, and the summary gives each headline metric per fold, their mean
and standard deviation, and the pooled OOF metrics. ``train.export --cv`` reads it into the model card.

    python -m train.cv --config train/configs/busi_unet_v4.yaml --runs train/runs/busi_unet_v4/cv --folds 0 1 2

Folds whose run folder already holds ``summary.json`` are not trained again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from busi_batch.classes import CLASS_NAMES
from busi_batch.discover import ImageItem
from busi_batch.imageio import atomic_write_text
from busi_batch.inference import Prediction, predict_images
from busi_batch.model import load_model, save_model
from busi_batch.postprocess import MaskRules

from . import tune_mask
from .calibrate import Calibration, fit_temperature, softmax
from .evaluate import ImageScore, fold_items, score_prediction, summarise
from .fit import TRAIN_FOLDS, fit, load_config, network_from_config, tune_runtime
from .split import load_split

SUMMARY = "cv_summary.json"
#: (block, key) of each metric reported per fold with its mean and spread.
HEADLINE = (
    ("segmentation", "dice_mean"), ("segmentation", "iou_mean"), ("segmentation", "false_positive_rate_normal"),
    ("classification", "accuracy"), ("classification", "f1_weighted"), ("classification", "mcc"),
    ("classification", "malignant_sensitivity"), ("classification", "ece"),
)


@dataclasses.dataclass(frozen=True)
class FoldPredictions:
    """One fold's out-of-fold predictions, paired with their items."""

    fold: str
    pairs: list[tuple[ImageItem, Prediction]]


def train_fold(config: dict[str, Any], runs: Path, fold: str) -> Path:
    """Train the recipe with ``fold`` held out, unless its run folder already finished; returns the folder."""
    run = runs / f"fold{fold}"
    if not (run / "summary.json").is_file():
        fit({**config, "val_fold": fold}, run)
    return run


def fold_checkpoint(config: dict[str, Any], run: Path) -> Path:
    """The run's final EMA weights as a loadable checkpoint (uncalibrated, plain 0.5 mask threshold)."""
    from .export import provisional_card  # export imports this module

    network = network_from_config(config)
    network.load_state_dict(torch.load(run / "last.pt", map_location="cpu", weights_only=True))
    weights = run / "checkpoint.pt"
    save_model(network.eval(), provisional_card(f"cv-{run.name}", config), weights)
    return weights


def predict_fold(config: dict[str, Any], run: Path, data: Path, split_path: Path, fold: str) -> FoldPredictions:
    loaded = load_model(fold_checkpoint(config, run))
    items = fold_items(data, load_split(split_path), fold)
    return FoldPredictions(fold, [(items[p.index], p) for p in predict_images(loaded, items)])


def calibrated(score: ImageScore, temperature: float) -> ImageScore:
    """The score with its class probabilities re-scaled by ``temperature`` (log-probabilities are logits up to a
    per-image constant, which the softmax ignores)."""
    logits = np.log(np.clip(score.probabilities, 1e-12, None))[None]
    return dataclasses.replace(score, probabilities=softmax(logits, temperature)[0])


#: Peak lesion probabilities tried for the "a confident lesion is not normal" rule (measured, see below).
EVIDENCE_PEAKS = (0.5, 0.7, 0.9, 0.95)


def lesion_evidence_rule(pairs: list[tuple[ImageItem, Prediction]]) -> list[dict[str, Any]]:
    """What overruling a *normal* verdict would do when the segmentation holds a confident lesion.

    For each peak in :data:`EVIDENCE_PEAKS`: images called normal whose lesion probability reaches the peak
    somewhere are re-assigned to the likelier of benign and malignant. Returns accuracy and MCC of the
    decisions with the rule, and how many verdicts it changed (and how many of those were right). The
    classifier already sees the peak and the mask-pooled features; this measures whether a hard rule on top
    would still help.
    """
    from sklearn.metrics import matthews_corrcoef

    truth = np.array([CLASS_NAMES.index(item.true_class) for item, _ in pairs])
    probs = np.stack([p.probabilities for _, p in pairs])
    peaks = np.array([float(p.lesion_probability.max()) for _, p in pairs])
    base = probs.argmax(axis=1)
    normal, benign, malignant = (CLASS_NAMES.index(c) for c in ("normal", "benign", "malignant"))
    rows = [{"peak": None, "accuracy": float(np.mean(base == truth)),
             "mcc": float(matthews_corrcoef(truth, base)), "changed": 0, "changed_right": 0}]
    for peak in EVIDENCE_PEAKS:
        flip = (base == normal) & (peaks >= peak)
        decided = np.where(flip, np.where(probs[:, malignant] > probs[:, benign], malignant, benign), base)
        rows.append({"peak": peak, "accuracy": float(np.mean(decided == truth)),
                     "mcc": float(matthews_corrcoef(truth, decided)), "changed": int(flip.sum()),
                     "changed_right": int((decided[flip] == truth[flip]).sum())})
    return rows


def headline(block: dict[str, Any]) -> dict[str, float | None]:
    """The :data:`HEADLINE` values of a ``summarise`` result (malignant sensitivity lifted out of per_class)."""
    classification = {**block["classification"],
                      "malignant_sensitivity": block["classification"]["per_class"]["malignant"]["sensitivity"]}
    sources = {"segmentation": block["segmentation"], "classification": classification}
    return {key: sources[part].get(key) for part, key in HEADLINE}


def spread(per_fold: dict[str, dict[str, float | None]]) -> dict[str, dict[str, float | None]]:
    """Mean and (sample) standard deviation over folds of each headline metric."""
    out: dict[str, dict[str, float | None]] = {}
    for _, key in HEADLINE:
        values = np.array([v[key] for v in per_fold.values() if v[key] is not None], dtype=float)
        out[key] = {
            "mean": float(values.mean()) if values.size else None,
            "sd": float(values.std(ddof=1)) if values.size > 1 else None,
        }
    return out


def cross_validate(
    config: dict[str, Any], runs: Path, folds: list[str], data: Path, split_path: Path, n_boot: int = 1000,
    train: bool = True,
) -> dict[str, Any]:
    """Train (if asked) and predict every fold, choose temperature and mask rules on the pooled OOF predictions,
    score each fold under them; write and return the summary."""
    runs.mkdir(parents=True, exist_ok=True)
    predictions = []
    for fold in folds:
        run = train_fold(config, runs, fold) if train else runs / f"fold{fold}"
        predictions.append(predict_fold(config, run, data, split_path, fold))
    protocol = (
        f"one fixed recipe ({config.get('phases')}); fold K trained on the other non-test folds, its final EMA "
        "weights scored on fold K at native resolution; temperature and mask rules chosen on the pooled "
        "out-of-fold predictions; the test portion never read"
    )
    summary = summarise_folds(predictions, config["geometry"] == "letterbox", protocol, n_boot)
    atomic_write_text(runs / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary


def summarise_folds(
    predictions: list[FoldPredictions], letterbox: bool, protocol: str, n_boot: int = 1000
) -> dict[str, Any]:
    """The cross-validation summary of out-of-fold predictions (any model that produced them): temperature and
    mask rules chosen on the pooled predictions, each fold scored under them, mean and spread, pooled metrics."""
    folds = [fp.fold for fp in predictions]
    pooled = [pair for fp in predictions for pair in fp.pairs]

    labels = np.array([CLASS_NAMES.index(item.true_class) for item, _ in pooled])
    log_probs = np.log(np.clip(np.stack([p.probabilities for _, p in pooled]), 1e-12, None))
    temperature: Calibration = fit_temperature(log_probs, labels)
    rule_scores = [tune_mask.score_rules(pooled, rules) for rules in tune_mask.candidate_rules(letterbox)]
    chosen = tune_mask.choose(rule_scores)
    rules = chosen.rules

    def scored(pairs: list[tuple[ImageItem, Prediction]]) -> list[ImageScore]:
        return [calibrated(score_prediction(item, pred, rules), temperature.temperature) for item, pred in pairs]

    per_fold = {fp.fold: headline(summarise(scored(fp.pairs), n_boot)) for fp in predictions}
    return {
        "protocol": protocol,
        "folds": folds,
        "n_images": {fp.fold: len(fp.pairs) for fp in predictions},
        "temperature": dataclasses.asdict(temperature),
        "mask_rules": {
            "criterion": f"mean per-image Dice over all out-of-fold images (dice_mean_all); simplest rules within "
                         f"{tune_mask.TIE} of the best",
            "chosen": tune_mask.row(chosen),
            "default": tune_mask.row(next(s for s in rule_scores if s.rules == MaskRules(letterbox=letterbox))),
        },
        "per_fold": per_fold,
        "mean_sd": spread(per_fold),
        "pooled": summarise(scored(pooled), n_boot),
        "lesion_evidence_rule": lesion_evidence_rule(pooled),
    }


def load_summary(runs: Path) -> dict[str, Any]:
    return json.loads((Path(runs) / SUMMARY).read_text())


def table(summary: dict[str, Any]) -> str:
    """Per-fold headline metrics, then mean +- sd."""
    keys = [key for _, key in HEADLINE]
    lines = ["fold   " + " ".join(f"{k[:10]:>10s}" for k in keys)]
    for fold, values in summary["per_fold"].items():
        lines.append(f"{fold:6s} " + " ".join("       n/a" if values[k] is None else f"{values[k]:10.3f}" for k in keys))
    ms = summary["mean_sd"]
    lines.append("mean   " + " ".join(f"{ms[k]['mean']:10.3f}" if ms[k]["mean"] is not None else "       n/a"
                                      for k in keys))
    lines.append("sd     " + " ".join(f"{ms[k]['sd']:10.3f}" if ms[k]["sd"] is not None else "       n/a"
                                      for k in keys))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--runs", type=Path, required=True, help="folder of the fold runs (fold0, fold1, ...)")
    parser.add_argument("--folds", nargs="+", default=["0", "1", "2"], choices=TRAIN_FOLDS)
    parser.add_argument("--data", type=Path, default=None, help="BUSI folder (default: the config's)")
    parser.add_argument("--no-train", action="store_true", help="only score folds that are already trained")
    parser.add_argument("--seed", type=int, default=None, help="override the config's seed (ensemble members)")
    args = parser.parse_args(argv)
    config = load_config(args.config, seed=args.seed)
    tune_runtime(int(config["threads"]))
    summary = cross_validate(config, args.runs, list(args.folds), Path(args.data or config["data"]),
                             Path(config["split"]), train=not args.no_train)
    print(table(summary))
    print(f"temperature {summary['temperature']['temperature']:.3f}; mask rules {summary['mask_rules']['chosen']}")


if __name__ == "__main__":
    main()
