"""A small ensemble of networks trained with one recipe and different seeds: cross-validated, then exported.

The members' logits are averaged (:class:`busi_batch.model.LogitEnsemble`), so an ensemble checkpoint runs
through the product exactly like a single network, at the members' summed cost. Whether the extra members earn
that cost is decided like any recipe: on out-of-fold predictions, never on test.

* ``cv``: for each fold K, the members' fold-K runs of :mod:`train.cv` (one CV folder per seed) are combined and
  predict fold K; temperature and mask rules are chosen on the pooled out-of-fold predictions exactly as for one
  network (:func:`train.cv.summarise_folds`), and the summary is printed beside each member's own.
* ``export``: the members trained on every non-test fold (run folders of ``train.fit --val-fold none``, or
  shipped checkpoints) are combined and published with the CV's temperature and mask rules; the test portion
  is read once, there.

    python -m train.cv --config train/configs/busi_unet_v4.yaml --runs train/runs/busi_unet_v5/cv_seed1235 --seed 1235
    python -m train.ensemble cv --members train/runs/busi_unet_v5/cv_seed1234 train/runs/busi_unet_v5/cv_seed1235 \\
        --out train/runs/busi_unet_v5/cv
    python -m train.ensemble export --members busi_batch/weights/busi_unet_v4.pt train/runs/busi_unet_v5/final_seed1235 \\
        --cv train/runs/busi_unet_v5/cv --name busi_unet_v5 --half
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from busi_batch.imageio import atomic_write_text
from busi_batch.inference import predict_images
from busi_batch.model import WEIGHTS_DIR, ModelCard, ensemble_of, load_model, load_network, save_model

from .calibrate import Calibration
from .cv import SUMMARY, FoldPredictions, load_summary, spread, summarise_folds, table
from .evaluate import fold_items
from .export import VERSION, build_network, load_run, make_card, provisional_card, publish
from .fit import TRAIN_FOLDS, load_config, tune_runtime
from .split import load_split

#: Card fields every member must share: they decide how an image becomes the input all members see.
INPUT_FIELDS = ("input_size", "input_geometry", "normalisation", "class_names")


@dataclass(frozen=True)
class Member:
    """One trained network, its provisional card (input contract) and how it was made."""

    network: nn.Module
    card: ModelCard
    provenance: dict[str, Any]


def member_from_run(run: Path, weights: str = "best.pt") -> Member:
    """The network a ``train.fit`` run folder holds (``best.pt``: for a fixed schedule, the final EMA weights)."""
    config, summary, _ = load_run(run)
    command = (run / "command.txt").read_text().strip() if (run / "command.txt").is_file() else None
    provenance = {"run": run.as_posix(), "seed": config.get("seed"), "training_command": command,
                  "training_minutes": summary.get("training_minutes")}
    return Member(build_network(config, run / weights), provisional_card(run.name, config), provenance)


def member_from_checkpoint(weights: Path) -> Member:
    """A published checkpoint (verified against its card's sha256) as a member."""
    network, card, path, digest = load_network(weights)
    provenance = {"checkpoint": path.name, "sha256": digest, "seed": card.extra.get("recipe", {}).get("seed"),
                  "training_command": card.extra.get("training_command"),
                  "training_minutes": card.extra.get("training_minutes")}
    return Member(network, card, provenance)


def load_member(path: Path) -> Member:
    return member_from_checkpoint(path) if Path(path).suffix == ".pt" else member_from_run(Path(path))


def check_compatible(members: list[Member]) -> None:
    """ValueError unless every member expects the same input (size, geometry, normalisation, class order)."""
    first = members[0].card
    for member in members[1:]:
        for name in INPUT_FIELDS:
            if getattr(member.card, name) != getattr(first, name):
                raise ValueError(f"ensemble members disagree on {name}: {getattr(first, name)!r} vs "
                                 f"{getattr(member.card, name)!r}")


def combine(members: list[Member], name: str) -> tuple[nn.Module, ModelCard]:
    """The ensemble network and a provisional card carrying the members' shared input contract."""
    check_compatible(members)
    ensemble = ensemble_of([m.network for m in members])
    first = members[0].card
    card = ModelCard(name=name, version=VERSION, architecture=dataclasses.asdict(ensemble.config),
                     **{field: getattr(first, field) for field in INPUT_FIELDS})
    return ensemble, card


# ---------------------------------------------------------------------------------------------- cross-validation
def cross_validate(member_cvs: list[Path], folds: list[str], out: Path, n_boot: int = 1000) -> dict[str, Any]:
    """Combine the members' fold runs fold by fold, predict each held-out fold, summarise as :mod:`train.cv`."""
    predictions = []
    config = load_config(Path(member_cvs[0]) / f"fold{folds[0]}" / "config.yaml")
    data, split = Path(config["data"]), load_split(Path(config["split"]))
    for fold in folds:
        members = [member_from_run(Path(cv) / f"fold{fold}", weights="last.pt") for cv in member_cvs]
        network, card = combine(members, f"cv-ensemble-fold{fold}")
        weights = out / f"fold{fold}" / "checkpoint.pt"
        save_model(network, card, weights)
        items = fold_items(data, split, fold)
        pairs = [(items[p.index], p) for p in predict_images(load_model(weights), items)]
        predictions.append(FoldPredictions(fold, pairs))
    protocol = (
        f"mean logits of {len(member_cvs)} members, each the same fixed recipe with its own seed; fold K's members "
        "trained on the other non-test folds (train.cv), their final EMA weights combined and scored on fold K at "
        "native resolution; temperature and mask rules chosen on the pooled out-of-fold predictions of the "
        "ensemble; the test portion never read"
    )
    summary = summarise_folds(predictions, config["geometry"] == "letterbox", protocol, n_boot)
    summary["members"] = [Path(cv).as_posix() for cv in member_cvs]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary


def comparison(summary: dict[str, Any], member_cvs: list[Path]) -> str:
    """Mean +- sd of Dice, MCC and their sum for the ensemble and for each member alone, over the same folds."""
    def row(label: str, per_fold: dict[str, Any]) -> str:
        per_fold = {fold: per_fold[fold] for fold in summary["folds"]}
        ms = spread(per_fold)
        both = [v["dice_mean"] + v["mcc"] for v in per_fold.values()]
        return (f"{label:40s} dice {ms['dice_mean']['mean']:.3f} ± {ms['dice_mean']['sd'] or 0:.3f}  "
                f"mcc {ms['mcc']['mean']:.3f} ± {ms['mcc']['sd'] or 0:.3f}  dice+mcc {sum(both) / len(both):.3f}  "
                f"acc {ms['accuracy']['mean']:.3f}  ece {ms['ece']['mean']:.3f}")

    lines = [row("ensemble", summary["per_fold"])]
    for cv in member_cvs:
        lines.append(row(Path(cv).name, load_summary(cv)["per_fold"]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- export
def export(
    member_paths: list[Path], cv: Path, name: str, weights_dir: Path = WEIGHTS_DIR, half: bool = False,
    n_boot: int = 1000,
) -> ModelCard:
    """Publish the ensemble of ``member_paths`` with the temperature and mask rules of the CV folder ``cv``.

    At least one member must be a run folder: its config names the data and split, and its run summary the
    training details the card restates.
    """
    members = [load_member(Path(p)) for p in member_paths]
    runs = [Path(p) for p in member_paths if Path(p).suffix != ".pt"]
    if not runs:
        raise ValueError("at least one member must be a train.fit run folder (it names the data and the split)")
    config, summary, git = load_run(runs[0])
    cv_summary = load_summary(cv)
    calibration = Calibration(**cv_summary["temperature"])
    network, card = combine(members, name)
    described = make_card(name, runs[0], config, summary, git, calibration, cv_summary)
    minutes = [m.provenance["training_minutes"] for m in members]
    extra = {
        **described.extra,
        "training_command": " ; ".join(str(m.provenance["training_command"]) for m in members)
        + f" ; python -m train.ensemble export --members {' '.join(map(str, member_paths))} --cv {cv} --name {name}",
        "training_minutes": sum(minutes) if all(isinstance(m, (int, float)) for m in minutes) else None,
        "ensemble": {"combination": "mean of the members' lesion logits and class logits",
                     "members": [m.provenance for m in members]},
    }
    card = dataclasses.replace(card, temperature=described.temperature, training_data=described.training_data,
                               extra=extra)
    return publish(network, card, Path(weights_dir) / f"{name}.pt", Path(config["data"]), Path(config["split"]),
                   cv_summary, half=half, n_boot=n_boot)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    cv_parser = commands.add_parser("cv", help="cross-validate the ensemble of the members' fold runs")
    cv_parser.add_argument("--members", type=Path, nargs="+", required=True, help="train.cv folders, one per seed")
    cv_parser.add_argument("--folds", nargs="+", default=["0", "1", "2"], choices=TRAIN_FOLDS)
    cv_parser.add_argument("--out", type=Path, required=True)
    ex_parser = commands.add_parser("export", help="publish the ensemble of members trained on every fold")
    ex_parser.add_argument("--members", type=Path, nargs="+", required=True,
                           help="train.fit run folders or published .pt checkpoints")
    ex_parser.add_argument("--cv", type=Path, required=True, help="the ensemble's cross-validation folder")
    ex_parser.add_argument("--name", required=True)
    ex_parser.add_argument("--weights-dir", type=Path, default=WEIGHTS_DIR)
    ex_parser.add_argument("--half", action="store_true", help="store float16 weights if test metrics do not move")
    args = parser.parse_args(argv)
    tune_runtime(2)
    torch.manual_seed(0)
    if args.command == "cv":
        summary = cross_validate(args.members, list(args.folds), args.out)
        print(table(summary))
        print(comparison(summary, args.members))
        print(f"temperature {summary['temperature']['temperature']:.3f}; mask rules {summary['mask_rules']['chosen']}")
    else:
        card = export(args.members, args.cv, args.name, args.weights_dir, half=args.half)
        print(f"wrote {Path(args.weights_dir) / (args.name + '.pt')} ({card.weights_dtype}, "
              f"sha256 {card.weights_sha256[:12]}…, T={card.temperature})")


if __name__ == "__main__":
    main()
