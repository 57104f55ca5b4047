"""Turn a training run into the shipped checkpoint: weights + a complete model card with calibrated temperature
and held-out test metrics.

Steps: load the run's ``best.pt`` (EMA weights), fit the temperature on the validation-fold logits, save with
``busi_batch.model.save_model`` (which hashes the ``.pt`` into the card), choose the mask rules on the validation
fold (``train.tune_mask``), evaluate the saved checkpoint on the test
fold through the production inference path, then write the metrics into the card. Only the JSON card is
rewritten after evaluation: the ``.pt`` and its sha256 stay exactly as evaluated.

With ``--half`` the weights are stored as float16 (half the size) only if the test metrics do not move versus
float32; otherwise float32 is kept and the card says why.

    python -m train.export --run train/runs/v1 --name busi_unet_v1 [--half]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
from pathlib import Path
from typing import Any

import torch
import yaml

from busi_batch.classes import CLASS_NAMES
from busi_batch.imageio import atomic_write_text
from busi_batch.model import WEIGHTS_DIR, ModelCard, card_path_for, load_model, save_model, sha256_file

from . import evaluate as evaluation
from . import tune_mask
from .calibrate import Calibration, calibrate_run
from .cv import load_summary as load_cv_summary
from .fit import NO_VALIDATION, network_from_config

VERSION = "1.0.0"
#: Headline test metrics that must not change when the weights are stored as float16.
HALF_CHECK = (
    ("classification", "accuracy"), ("classification", "mcc"), ("classification", "f1_weighted"),
    ("segmentation", "dice_mean"), ("segmentation", "iou_mean"),
)
HALF_TOLERANCE = 0.002

SPLIT_PROTOCOL = (
    "Images grouped by union-find over near-duplicate pairs (the dataset's near_duplicate_candidates.csv plus a "
    "dHash/64x64-correlation screen); the byte-identical cross-class pair benign (433) / malignant (145) excluded. "
    "StratifiedGroupKFold(5, shuffle, fixed seed) over groups: one fold (~20%, class-stratified) is the held-out "
    "test portion, never used for training, model selection or calibration; the rest is split again into 5 "
    "group folds, fold {val_fold} for validation (model selection, temperature), the other 4 for training."
)
SPLIT_PROTOCOL_ALL_FOLDS = SPLIT_PROTOCOL.split(" the rest is split")[0] + (
    " the rest is split again into 5 group folds. The recipe and its fixed schedule were cross-validated on folds "
    "{folds} (each trained on the other four); temperature and mask rules were chosen on those out-of-fold "
    "predictions. The shipped weights are trained on all 5 folds with the same schedule."
)


def load_run(run: Path) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The run's resolved config, summary and git description."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    git = (run / "git_commit.txt").read_text().strip() if (run / "git_commit.txt").is_file() else "unknown"
    return config, summary, git


def build_network(config: dict[str, Any], state_path: Path) -> torch.nn.Module:
    network = network_from_config(config)
    network.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
    return network.eval()


def provisional_card(name: str, config: dict[str, Any]) -> ModelCard:
    """What the config alone says about a checkpoint: architecture, input size and geometry, normalisation.
    Temperature 1 and the plain 0.5 mask threshold until calibration and mask rules are chosen."""
    return ModelCard(
        name=name,
        version=VERSION,
        architecture=dataclasses.asdict(network_from_config(config).config),
        input_size=int(config["size"]),
        input_geometry=config.get("geometry", "squash"),
        normalisation={k: float(v) for k, v in config["normalisation"].items()},
        class_names=list(CLASS_NAMES),
    )


def training_command(run: Path, config: dict[str, Any]) -> str:
    """The command recorded by train.fit, or the one that reproduces the resolved config."""
    recorded = run / "command.txt"
    if recorded.is_file():
        return recorded.read_text().strip()
    command = f"python -m train.fit --config train/configs/default.yaml --out {run}"
    return command + (f" --max-minutes {config['max_minutes']:g}" if config.get("max_minutes") else "")


def make_card(
    name: str, run: Path, config: dict[str, Any], summary: dict[str, Any], git: str, calibration: Calibration,
    cv: dict[str, Any] | None = None,
) -> ModelCard:
    """Everything known before test evaluation; ``metrics`` is filled in afterwards. ``cv`` is a
    :mod:`train.cv` summary when temperature and mask rules come from out-of-fold predictions."""
    split_path = Path(config["split"])
    split_sha = sha256_file(split_path) if split_path.is_file() else "unknown"
    fixed_schedule = str(config["val_fold"]) == NO_VALIDATION
    if fixed_schedule:
        protocol = SPLIT_PROTOCOL_ALL_FOLDS.format(folds=", ".join(cv["folds"]) if cv else "?")
        trained = f" Trained on {summary.get('n_train', '?')} images (all non-test folds)."
    else:
        protocol = SPLIT_PROTOCOL.format(val_fold=config["val_fold"])
        trained = f" Trained on {summary.get('n_train', '?')} images, validated on {summary.get('n_val', '?')}."
    training_data = (
        "BUSI (Al-Dhabyani et al., Data in Brief 28 (2020) 104863; 780 breast ultrasound images, 437 benign, "
        "210 malignant, 133 normal, with lesion masks; Baheya Hospital, Cairo, 2018). "
        f"Split file {split_path.as_posix()} (sha256 {split_sha}). " + protocol + trained
    )
    extra_cv = {"cross_validation": {k: cv[k] for k in ("protocol", "folds", "n_images", "per_fold", "mean_sd")}} \
        if cv else {}
    return dataclasses.replace(
        provisional_card(name, config),
        temperature=round(calibration.temperature, 4),
        training_data=training_data,
        extra={
            "training_command": training_command(run, config),
            "hardware": f"2-core CPU, no GPU ({platform.processor() or platform.machine()}), torch {torch.__version__}",
            "training_precision": config.get("precision", "fp32"),
            "training_minutes": summary.get("training_minutes"),
            "epochs": {"done": summary.get("epochs_done"), "planned": summary.get("epochs_planned"),
                       "best_epoch": summary.get("best_epoch"), "stopped_early": summary.get("stopped_early")},
            "selection": "EMA weights at the end of the fixed schedule (no epoch selection)" if fixed_schedule
            else "EMA weights of the joint-phase epoch with the best validation Dice + MCC",
            "git_commit": git,
            "split_sha256": split_sha,
            "calibration": {
                "method": "temperature scaling, NLL minimised on the " + (
                    "pooled out-of-fold predictions of the cross-validation" if cv else "validation fold"),
                **{k: round(v, 5) if isinstance(v, float) else v for k, v in dataclasses.asdict(calibration).items()},
            },
            "recipe": {k: config[k] for k in ("phases", "optimizer", "loss", "ema", "batch_size", "seed")},
            **extra_cv,
        },
    )


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    return {f"{a}.{b}": metrics[a][b] for a, b in HALF_CHECK}


def half_matches(fp32: dict[str, Any], fp16: dict[str, Any]) -> bool:
    a, b = headline(fp32), headline(fp16)
    return all(abs(a[k] - b[k]) <= HALF_TOLERANCE for k in a)


def export(
    run: Path, name: str, weights_dir: Path = WEIGHTS_DIR, half: bool = False, data: Path | None = None,
    n_boot: int = 1000, tune_rules: bool = True, cv: Path | None = None,
) -> ModelCard:
    """Write ``weights_dir/name.pt`` + ``.json`` from the run and fill the card's test metrics.

    Without ``cv`` the temperature and mask rules are chosen on the run's validation fold; with ``cv`` (a
    :mod:`train.cv` folder) they come from its out-of-fold choices, as they must for a run trained on every fold.
    """
    run = Path(run)
    config, summary, git = load_run(run)
    cv_summary = load_cv_summary(cv) if cv else None
    if cv_summary is None and str(config["val_fold"]) == NO_VALIDATION:
        raise ValueError(f"{run} was trained on every fold: temperature and mask rules need --cv")
    calibration = Calibration(**cv_summary["temperature"]) if cv_summary else calibrate_run(run)
    network = build_network(config, run / "best.pt")
    card = make_card(name, run, config, summary, git, calibration, cv_summary)
    return publish(network, card, Path(weights_dir) / f"{name}.pt", Path(data or config["data"]),
                   Path(config["split"]), cv_summary, validation_fold=str(config["val_fold"]) if tune_rules else None,
                   half=half, n_boot=n_boot)


def publish(
    network: torch.nn.Module, card: ModelCard, weights: Path, data: Path, split: Path,
    cv_summary: dict[str, Any] | None, validation_fold: str | None = None, half: bool = False, n_boot: int = 1000,
) -> ModelCard:
    """Save ``network`` with ``card`` as ``weights``, set the mask rules (the CV's out-of-fold choice, else chosen
    on ``validation_fold``, else the plain rules), evaluate once on the test portion and write the metrics into
    the card; float16 is kept under ``half`` only if the headline metrics do not move."""
    card = save_model(network, card, weights, half=False)
    chosen: dict[str, Any] | None = None
    if cv_summary:
        chosen = cv_summary["mask_rules"]["chosen"]
        record = {"source": "cross-validation out-of-fold predictions", **cv_summary["mask_rules"]}
    elif validation_fold is not None:
        tuning = tune_mask.tune(load_model(weights), data, split, validation_fold)
        chosen = tuning["chosen"]
        record = {k: tuning[k] for k in ("fold", "n_images", "criterion", "chosen", "default")}
        print(f"mask rules (validation fold {tuning['fold']}): {chosen}  [default: {tuning['default']}]")
    if chosen is not None:
        card = dataclasses.replace(
            card, threshold=chosen["threshold"], min_component_fraction=chosen["min_component_fraction"],
            empty_when_normal=chosen["empty_when_normal"], extra={**card.extra, "mask_rules": record},
        )
        card = save_model(network, card, weights, half=False)
    metrics = evaluation.evaluate(weights, data, split, n_boot=n_boot)
    print("float32:\n" + evaluation.table(metrics))
    if half:
        half_card = save_model(network, card, weights, half=True)
        half_metrics = evaluation.evaluate(weights, data, split, n_boot=n_boot)
        print("float16:\n" + evaluation.table(half_metrics))
        if half_matches(metrics, half_metrics):
            card, metrics = half_card, half_metrics
            check = f"float16 headline metrics within {HALF_TOLERANCE} of float32: kept float16"
        else:
            card = save_model(network, card, weights, half=False)
            check = f"float16 moved a headline metric by more than {HALF_TOLERANCE}: kept float32"
        card = dataclasses.replace(card, extra={**card.extra, "half_check": check})
    card = dataclasses.replace(card, metrics=metrics)
    atomic_write_text(card_path_for(weights), card.to_json())  # the .pt (and its sha256) is unchanged
    assert sha256_file(weights) == card.weights_sha256
    return card


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--name", default="busi_unet_v1")
    parser.add_argument("--weights-dir", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--data", type=Path, default=None, help="BUSI folder (default: the run config's)")
    parser.add_argument("--half", action="store_true", help="store float16 weights if test metrics do not move")
    parser.add_argument("--cv", type=Path, default=None,
                        help="train.cv folder: temperature and mask rules from its out-of-fold predictions")
    parser.add_argument("--plain-mask", action="store_true",
                        help="keep the plain 0.5 threshold instead of choosing mask rules on the validation fold")
    args = parser.parse_args(argv)
    card = export(args.run, args.name, args.weights_dir, half=args.half, data=args.data,
                  tune_rules=not args.plain_mask, cv=args.cv)
    weights = Path(args.weights_dir) / f"{args.name}.pt"
    print(f"wrote {weights} ({card.weights_dtype}, sha256 {card.weights_sha256[:12]}…, T={card.temperature})")


if __name__ == "__main__":
    main()
