"""Training code on tiny synthetic data: cache preparation, losses, augmentation, a short fit, export + evaluate."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from busi_batch.classes import CLASS_NAMES  # noqa: E402
from busi_batch.model import load_model  # noqa: E402
from busi_batch.postprocess import MaskRules  # noqa: E402
from train.augment import augment_pair, build_augment  # noqa: E402
from train.calibrate import fit_temperature  # noqa: E402
from train.fit import DEFAULTS, EMA, fit, lr_factor, merge, select_folds  # noqa: E402
from train.losses import ClassificationLoss, SegmentationLoss, class_weights, soft_dice_loss  # noqa: E402
from train.tune_mask import RuleScore, choose  # noqa: E402
from train.prepare import delta_decode, delta_encode, load_cache, prepare, save_cache  # noqa: E402


# ---------------------------------------------------------------------------------------------- fake BUSI
def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


def make_fake_busi(root: Path, per_class: int = 4) -> Path:
    """BUSI layout with varied sizes, one colour image, one lesion split over ``_mask`` and ``_mask_1``."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASS_NAMES):
        for k in range(1, per_class + 1):
            h, w = 40 + 4 * k, 48 + 2 * c
            image = (rng.random((h, w)) * 120).astype(np.uint8)
            mask = np.zeros((h, w), dtype=np.uint8)
            if name != "normal":
                mask[10 : 10 + 8 * c, 12:30] = 255
                image[mask > 0] = 220
            stem = root / name / f"{name} ({k})"
            if name == "malignant" and k == 1:
                image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
            if name == "benign" and k == 1:  # lesion in two files: the cache must hold their union
                second = np.zeros_like(mask)
                second[30:38, 5:15] = 255
                _write(stem.parent / f"{stem.name}_mask_1.png", second)
            _write(stem.parent / f"{stem.name}.png", image)
            _write(stem.parent / f"{stem.name}_mask.png", mask)
    (root / "curated_subset_aumente2024.csv").write_text("class;id\nbenign;1\nbenign;2\nmalignant;3\n")
    return root


@pytest.fixture(scope="module")
def fake_busi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_busi(tmp_path_factory.mktemp("busi"))


def test_prepare_shapes_labels_and_union_masks(fake_busi: Path, tmp_path: Path) -> None:
    arrays = prepare(fake_busi, 32)
    n = 3 * 4
    assert arrays["images"].shape == (n, 32, 32) and arrays["images"].dtype == np.uint8
    assert arrays["masks"].shape == (n, 32, 32) and set(np.unique(arrays["masks"])) <= {0, 1}
    rel = arrays["rel"].tolist()
    labels = dict(zip(rel, arrays["labels"].tolist()))
    assert labels["normal/normal (1).png"] == 0 and labels["benign/benign (2).png"] == 1
    assert labels["malignant/malignant (1).png"] == 2
    masks = dict(zip(rel, arrays["masks"]))
    assert not masks["normal/normal (3).png"].any()
    union = masks["benign/benign (1).png"]
    single = masks["benign/benign (2).png"]
    assert union[23:27, 4:9].all() and not single[23:27, 4:9].any()  # the _mask_1 lesion is in the union
    path = tmp_path / "cache.npz"
    save_cache(path, arrays)
    loaded = load_cache(path)
    for key in ("images", "masks", "labels", "rel"):
        assert np.array_equal(loaded[key], arrays[key])


def test_burnt_in_calipers_and_text_are_found_and_painted_out(fake_busi: Path, tmp_path: Path) -> None:
    """A caliper cross and a text stroke drawn on speckle are found (and little else), painted away, and cached as
    the ``painted`` copy that training can swap in."""
    from train.annotations import annotation_mask, painted_out

    rng = np.random.default_rng(5)
    frame = cv2.GaussianBlur(rng.integers(40, 120, (120, 160), dtype=np.uint8), (5, 5), 0)
    marked = frame.copy()
    cv2.line(marked, (50, 60), (60, 60), 255, 1)
    cv2.line(marked, (55, 55), (55, 65), 255, 1)
    cv2.putText(marked, "LT", (100, 100), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 255, 1)
    marks = annotation_mask(marked)
    drawn = marked != frame
    assert marks[drawn].mean() > 0.95 and marks[~drawn].mean() < 0.05
    painted = painted_out(marked, marks)
    assert painted[drawn].max() < 200 and np.abs(painted.astype(int) - frame).mean() < 3
    arrays = prepare(fake_busi, 32, paint=True)
    assert arrays["painted"].shape == arrays["images"].shape
    save_cache(tmp_path / "painted.npz", arrays)
    assert np.array_equal(load_cache(tmp_path / "painted.npz")["painted"], arrays["painted"])


def test_delta_coding_is_lossless() -> None:
    images = np.random.default_rng(3).integers(0, 256, (4, 16, 16), dtype=np.uint8)
    assert np.array_equal(delta_decode(delta_encode(images)), images)


# ---------------------------------------------------------------------------------------------- losses
def test_dice_loss_perfect_and_disjoint() -> None:
    target = torch.zeros(2, 1, 16, 16)
    target[:, :, 4:10, 4:10] = 1
    perfect = (target * 2 - 1) * 30
    assert soft_dice_loss(perfect, target).item() < 1e-3
    disjoint = (1 - target * 2) * 30
    assert soft_dice_loss(disjoint, target).item() > 0.99


def test_segmentation_loss_accepts_empty_masks() -> None:
    empty = torch.zeros(2, 1, 8, 8)
    loss = SegmentationLoss(pos_weight=2.0)
    assert loss(torch.full_like(empty, -30.0), empty).item() < 1e-3  # "no lesion" predicted on a normal image
    assert loss(torch.full_like(empty, 5.0), empty).item() > 1.0  # lesion predicted where there is none


def test_cross_entropy_with_smoothing_and_weights() -> None:
    labels = torch.tensor([0, 1, 2])
    confident = torch.eye(3) * 30
    assert ClassificationLoss(label_smoothing=0.0)(confident, labels).item() < 1e-6
    smoothed = ClassificationLoss(label_smoothing=0.1)(confident, labels).item()
    assert smoothed > 0.1  # smoothing penalises over-confidence
    assert ClassificationLoss(label_smoothing=0.1)(torch.eye(3) * 3, labels).item() < smoothed
    weights = class_weights([0, 1, 1, 1, 1, 2, 2], 3)
    assert math.isclose(weights.mean().item(), 1.0, rel_tol=1e-6)
    assert weights[0] > weights[2] > weights[1]


# ---------------------------------------------------------------------------------------------- pieces
def test_augment_keeps_shape_binary_mask_and_is_seeded() -> None:
    image = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[20:40, 20:40] = 1
    out = [augment_pair(build_augment(seed=7), image, mask) for _ in range(2)]
    for im, m in out:
        assert im.shape == (64, 64) and im.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}
    assert np.array_equal(out[0][0], out[1][0])


def test_lesion_keeping_augmentation_never_returns_a_frame_the_lesion_has_left() -> None:
    """A lesion in the corner: strong crops and shifts often push it out; with ``lesion_keep`` every draw keeps at
    least that share of its area (or the pair comes back unchanged), and lesion-free pairs are still augmented."""
    from train.augment import AugmentConfig

    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[2:10, 2:10] = 1
    config = AugmentConfig(p_affine=1.0, translate=0.3, p_crop=1.0, crop_min_area=0.3, rotate_deg=30.0)
    pipeline = build_augment(config, seed=3, size=64)
    plain = [np.count_nonzero(augment_pair(pipeline, image, mask)[1]) / mask.sum() for _ in range(100)]
    assert min(plain) < 0.5  # without the guard the lesion does leave the frame
    kept = [augment_pair(pipeline, image, mask, lesion_keep=0.5, tries=3) for _ in range(100)]
    assert all(np.count_nonzero(m) >= 0.5 * mask.sum() for _, m in kept)
    empty = np.zeros_like(mask)
    outs = [augment_pair(pipeline, image, empty, lesion_keep=0.5)[0] for _ in range(5)]
    assert any(not np.array_equal(o, image) for o in outs)


def test_lr_schedule_warms_up_then_decays() -> None:
    assert lr_factor(0, 100, 10, 0.02) == pytest.approx(0.1)
    assert lr_factor(10, 100, 10, 0.02) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, 0.02) == pytest.approx(0.02)
    # a slow machine: half the time budget used after a fifth of the steps -> the cosine is at its midpoint
    assert lr_factor(28, 100, 10, 0.0, time_fraction=0.5) == pytest.approx(0.5)
    assert lr_factor(50, 100, 10, 0.02, time_fraction=1.5) == pytest.approx(0.02)


def test_ema_moves_towards_the_model_including_bn_buffers() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    ema = EMA(model, decay=0.5, warmup=1)
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(2.0)
    before = ema.model[0].weight.clone()
    ema.update(model)
    assert torch.allclose(ema.model[0].weight, before + 0.5)
    assert torch.allclose(ema.model[1].running_mean, torch.full((2,), 1.0))


def test_fold_selection_never_includes_test_or_excluded(fake_busi: Path) -> None:
    arrays = prepare(fake_busi, 32)
    split = fake_split(arrays["rel"])
    data = select_folds(arrays, split, "0")
    assert data.train_labels.size == int(split["fold"].isin(["1", "2", "3", "4"]).sum()) == 5
    assert sorted(data.val_rel) == sorted(split.loc[split["fold"] == "0", "image"])
    held_out = split["fold"].isin(["test", "excluded"]).to_numpy()
    held_out_images = arrays["images"][held_out]
    for image in data.train_images:  # images are distinct noise, so equality identifies the file
        assert not any(np.array_equal(image, other) for other in held_out_images)


# ---------------------------------------------------------------------------------------------- end to end
def fake_split(rel: np.ndarray) -> pd.DataFrame:
    """Image k of each class: 1 -> test, 2 -> validation, 3 -> train, 4 -> train; one excluded."""
    folds = []
    for r in rel:
        k = int(r.split("(")[1].split(")")[0])
        folds.append({1: "test", 2: "0", 3: "1", 4: "2"}[k])
    split = pd.DataFrame({"image": rel, "class": [r.split("/")[0] for r in rel], "group": rel, "fold": folds})
    split.loc[split["image"] == "benign/benign (4).png", "fold"] = "excluded"
    return split


def tiny_config(data: Path, split_csv: Path) -> dict:
    config = merge(DEFAULTS, {
        "data": str(data), "split": str(split_csv), "cache": "unused", "size": 32, "batch_size": 2,
        "eval_batch_size": 4, "threads": 1, "model": {"base_width": 4, "depth": 3},
        "phases": {"seg": {"epochs": 1}, "joint": {"epochs": 1}},
        "ema": {"decay": 0.9, "warmup": 1},
    })
    return copy.deepcopy(config)


def tiny_study(data: Path, tmp_path: Path) -> tuple[dict[str, np.ndarray], pd.DataFrame, Path, dict]:
    """The fake study cached at 32 px, its split written to ``tmp_path``, and a tiny config naming both."""
    arrays = prepare(data, 32)
    split = fake_split(arrays["rel"])
    split_csv = tmp_path / "split.csv"
    split.to_csv(split_csv, index=False)
    return arrays, split, split_csv, tiny_config(data, split_csv)


def test_tiny_fit_then_export_and_evaluate(fake_busi: Path, tmp_path: Path) -> None:
    from train.export import export

    arrays, split, _, config = tiny_study(fake_busi, tmp_path)
    run = tmp_path / "run"
    result = fit(config, run, arrays=arrays, split=split)
    assert result.epochs_done == 2 and result.best_epoch == 2
    log = pd.read_csv(run / "log.csv")
    assert log["phase"].tolist() == ["seg", "joint"]
    assert np.isfinite(log[["train_loss", "train_seg_loss", "train_cls_loss"]].to_numpy()).all()
    for name in ("best.pt", "last.pt", "config.yaml", "git_commit.txt", "summary.json", "val_logits.npz"):
        assert (run / name).is_file(), name
    state = torch.load(run / "best.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    with np.load(run / "val_logits.npz") as val:
        assert val["logits"].shape == (3, 3) and sorted(val["labels"].tolist()) == [0, 1, 2]

    card = export(run, "tiny_v1", weights_dir=tmp_path / "weights", data=fake_busi, n_boot=20)
    loaded = load_model(tmp_path / "weights" / "tiny_v1.pt")  # sha256 still matches after the card rewrite
    saved = json.loads((tmp_path / "weights" / "tiny_v1.json").read_text())
    assert saved["metrics"]["classification"]["n_images"] == 3  # the three test images, nothing else
    assert saved["metrics"]["segmentation"]["n_images"] == 3
    assert saved["metrics"]["curated_subset"]["classification"]["n_images"] == 1  # benign 1: curated and test
    assert card.temperature > 0 and loaded.card.weights_sha256 == card.weights_sha256
    assert "ece_before" in saved["extra"]["calibration"]
    rules = saved["extra"]["mask_rules"]  # chosen on validation fold 0 (3 images), recorded with its scores
    assert rules["fold"] == "0" and rules["n_images"] == 3
    assert loaded.card.mask_rules() == MaskRules(rules["chosen"]["threshold"], rules["chosen"]["min_component_fraction"],
                                                 rules["chosen"]["empty_when_normal"])
    assert saved["metrics"]["evaluation"]["mask_rules"] == loaded.card.mask_rules().key()


def test_mask_rule_choice_prefers_the_simplest_of_the_near_best() -> None:
    scores = [
        RuleScore(MaskRules(0.5), 0.700, 0.5, None),
        RuleScore(MaskRules(0.4), 0.702, 0.5, None),  # within the tie: no better than plain 0.5
        RuleScore(MaskRules(0.5, 0.001, True), 0.760, 0.5, None),
        RuleScore(MaskRules(0.5, 0.0, True), 0.758, 0.5, None),  # as good, one rule fewer
        RuleScore(MaskRules(0.3, 0.0, True), 0.759, 0.5, None),
    ]
    assert choose(scores).rules == MaskRules(0.5, 0.0, True)
    assert choose(scores[:2]).rules == MaskRules(0.5)
    assert choose(scores[:2], tie=0.0).rules == MaskRules(0.4)


def test_fit_temperature_recovers_a_known_temperature() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(size=(4000, 3)) * 2
    probs = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(3, p=p) for p in probs])
    calibration = fit_temperature(true_logits * 2.5, labels)  # over-confident by a factor 2.5
    assert calibration.temperature == pytest.approx(2.5, rel=0.15)
    assert calibration.nll_after <= calibration.nll_before


def test_bf16_training_step_moves_the_weights_in_fp32(fake_busi: Path, tmp_path: Path) -> None:
    """precision: bf16 runs the forward passes under autocast; weights, losses and the log stay finite float32."""
    arrays, split, _, config = tiny_study(fake_busi, tmp_path)
    config["precision"] = "bf16"
    result = fit(config, tmp_path / "run", arrays=arrays, split=split)
    assert result.epochs_done == 2
    log = pd.read_csv(tmp_path / "run" / "log.csv")
    assert np.isfinite(log[["train_loss", "val_dice"]].to_numpy(dtype=float)).all()
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_unknown_training_precision_is_refused() -> None:
    from train.fit import autocast

    with pytest.raises(ValueError, match="fp16"):
        autocast({"precision": "fp16"})


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_validation_builds_no_autograd_graph(fake_busi: Path, tmp_path: Path, precision: str) -> None:
    """Validation runs without gradients, whatever the model's parameters say (a graph per batch costs memory)."""
    from busi_batch.model import MultiTaskUNet, UNetConfig
    from train.fit import evaluate as validate

    arrays = prepare(fake_busi, 32)
    data = select_folds(arrays, fake_split(arrays["rel"]), "0")
    config = tiny_config(fake_busi, tmp_path / "unused.csv")
    config["precision"] = precision
    model = MultiTaskUNet(UNetConfig(base_width=4, depth=3))  # parameters require grad, as in training
    result = validate(model, data, config)
    assert result["logits"].shape == (len(data.val_labels), 3) and 0.0 <= result["acc"] <= 1.0


def test_cross_validation_then_a_fixed_schedule_model_exported_with_out_of_fold_choices(
    fake_busi: Path, tmp_path: Path,
) -> None:
    """train.cv trains each fold on the others and chooses temperature + mask rules on out-of-fold predictions
    only; a run on every fold (val_fold none) exports with those choices and is scored once on test."""
    from train.cv import cross_validate, load_summary
    from train.export import export

    arrays, split, split_csv, config = tiny_study(fake_busi, tmp_path)
    config["cache"] = str(tmp_path / "cache.npz")
    summary = cross_validate(config, tmp_path / "cv", ["0", "1"], fake_busi, split_csv, n_boot=20)
    assert summary["n_images"] == {"0": 3, "1": 3}  # each fold's own images, never a test one
    assert summary["pooled"]["classification"]["n_images"] == 6
    assert set(summary["per_fold"]) == {"0", "1"} and summary["temperature"]["temperature"] > 0
    assert summary["mean_sd"]["accuracy"]["mean"] == pytest.approx(
        np.mean([summary["per_fold"][f]["accuracy"] for f in ("0", "1")]))
    assert load_summary(tmp_path / "cv") == json.loads(json.dumps(summary))
    evidence = summary["lesion_evidence_rule"]
    assert evidence[0]["peak"] is None and evidence[0]["changed"] == 0
    assert evidence[0]["accuracy"] == pytest.approx(summary["pooled"]["classification"]["accuracy"])

    final = tmp_path / "final"
    fit({**config, "val_fold": "none"}, final, arrays=arrays, split=split)
    assert json.loads((final / "summary.json").read_text())["n_train"] == 8  # folds 0-2, not test or excluded
    with pytest.raises(ValueError, match="--cv"):
        export(final, "tiny_v2", weights_dir=tmp_path / "weights", data=fake_busi, n_boot=20)
    card = export(final, "tiny_v2", weights_dir=tmp_path / "weights", data=fake_busi, n_boot=20, cv=tmp_path / "cv")
    assert card.temperature == pytest.approx(summary["temperature"]["temperature"], abs=1e-4)
    assert card.threshold == summary["mask_rules"]["chosen"]["threshold"]
    assert card.extra["cross_validation"]["folds"] == ["0", "1"]
    assert card.metrics["classification"]["n_images"] == 3 and "ece" in card.metrics["classification"]
    load_model(tmp_path / "weights" / "tiny_v2.pt")


def test_seed_ensemble_cross_validated_then_exported_from_a_run_and_a_checkpoint(
    fake_busi: Path, tmp_path: Path,
) -> None:
    """train.ensemble combines two seeds' fold runs fold by fold with choices made on the ensemble's own
    out-of-fold predictions, then publishes members trained on every fold: one a run folder, one a checkpoint."""
    from busi_batch.model import save_model
    from train.cv import cross_validate
    from train.ensemble import cross_validate as ensemble_cv
    from train.ensemble import export as ensemble_export
    from train.export import build_network, provisional_card

    arrays, split, split_csv, config = tiny_study(fake_busi, tmp_path)
    config["cache"] = str(tmp_path / "cache.npz")
    for seed in (1, 2):
        cross_validate({**config, "seed": seed}, tmp_path / f"cv{seed}", ["0", "1"], fake_busi, split_csv, n_boot=20)
    summary = ensemble_cv([tmp_path / "cv1", tmp_path / "cv2"], ["0", "1"], tmp_path / "cv", n_boot=20)
    assert summary["n_images"] == {"0": 3, "1": 3} and summary["members"][1].endswith("cv2")
    assert json.loads((tmp_path / "cv" / "cv_summary.json").read_text())["folds"] == ["0", "1"]
    fold0 = load_model(tmp_path / "cv" / "fold0" / "checkpoint.pt")
    assert fold0.card.architecture_name() == "ensemble"

    finals = []
    for seed in (1, 2):
        finals.append(tmp_path / f"final{seed}")
        fit({**config, "val_fold": "none", "seed": seed}, finals[-1], arrays=arrays, split=split)
    run_config = json.loads(json.dumps(config))  # the run folder's own config names the data and the split
    member_pt = tmp_path / "member2.pt"
    save_model(build_network({**run_config, "val_fold": "none"}, finals[1] / "best.pt"),
               provisional_card("member2", run_config), member_pt)
    with pytest.raises(ValueError, match="run folder"):
        ensemble_export([member_pt, member_pt], tmp_path / "cv", "tiny_ens", weights_dir=tmp_path / "w", n_boot=20)
    card = ensemble_export([finals[0], member_pt], tmp_path / "cv", "tiny_ens", weights_dir=tmp_path / "w",
                           n_boot=20)
    assert card.architecture_name() == "ensemble" and len(card.architecture["members"]) == 2
    assert card.temperature == pytest.approx(summary["temperature"]["temperature"], abs=1e-4)
    assert card.threshold == summary["mask_rules"]["chosen"]["threshold"]
    provenance = card.extra["ensemble"]["members"]
    assert provenance[0]["seed"] == 1 and provenance[1]["checkpoint"] == "member2.pt"
    assert card.metrics["classification"]["n_images"] == 3
    loaded = load_model(tmp_path / "w" / "tiny_ens.pt")
    assert loaded.sha256 == card.weights_sha256

    # an operating point chosen on the same CV folder goes into the card; the weights file stays as it was
    from train.operating_point import apply
    with_point = apply(tmp_path / "w" / "tiny_ens.pt", tmp_path / "cv", fake_busi, split_csv, enforce_rule=False,
                       n_boot=20)
    assert len(with_point.class_bias) == 3 and with_point.class_bias[1] == 0.0
    assert with_point.metrics["evaluation"]["class_bias"] == with_point.class_bias
    assert with_point.extra["operating_point"]["nested_estimate"]["chosen"].keys() == {"0", "1"}
    reloaded = load_model(tmp_path / "w" / "tiny_ens.pt")
    assert reloaded.card.class_bias == with_point.class_bias and reloaded.sha256 == card.weights_sha256


def test_lesion_evidence_rule_overrules_only_confident_normal_verdicts() -> None:
    from busi_batch.discover import ImageItem
    from busi_batch.inference import Prediction
    from train.cv import lesion_evidence_rule

    def pair(true: str, probs: list[float], peak: float) -> tuple:
        lesion = np.zeros((4, 4), dtype=np.float32)
        lesion[0, 0] = peak
        return (ImageItem(path=Path("x.png"), rel="x.png", true_class=true),
                Prediction(index=0, input_sha256="", height=4, width=4, probabilities=np.array(probs),
                           lesion_probability=lesion))

    pairs = [pair("benign", [0.6, 0.3, 0.1], 0.97),     # called normal, confident lesion: becomes benign (right)
             pair("normal", [0.7, 0.1, 0.2], 0.6),      # called normal, weak blob: stays normal below 0.7
             pair("malignant", [0.1, 0.2, 0.7], 0.99),  # not called normal: never touched
             pair("normal", [0.8, 0.15, 0.05], 0.1)]
    rows = {row["peak"]: row for row in lesion_evidence_rule(pairs)}
    assert rows[None]["accuracy"] == pytest.approx(0.75) and rows[None]["changed"] == 0
    assert rows[0.9]["changed"] == 1 and rows[0.9]["changed_right"] == 1 and rows[0.9]["accuracy"] == 1.0
    assert rows[0.5]["changed"] == 2 and rows[0.5]["changed_right"] == 1 and rows[0.5]["accuracy"] == 0.75


def test_a_config_inherits_its_base_and_overrides_only_what_it_states(tmp_path: Path) -> None:
    from train.fit import load_config

    (tmp_path / "parent.yaml").write_text(
        "size: 128\nbatch_size: 8\nmodel: {name: lite_unet, encoder: efficientnet-lite0, dropout: 0.1}\n"
        "augment: {p_flip: 0.2, aspect: 0.1}\n")
    (tmp_path / "child.yaml").write_text(
        "base: parent.yaml\nbatch_size: 4\nmodel: {encoder: efficientnet-lite1}\naugment: {aspect: 0.3}\n")
    config = load_config(tmp_path / "child.yaml")
    assert (config["size"], config["batch_size"]) == (128, 4)
    assert config["model"] == {"name": "lite_unet", "encoder": "efficientnet-lite1", "dropout": 0.1}
    assert config["augment"] == {"p_flip": 0.2, "aspect": 0.3}

    (tmp_path / "other.yaml").write_text("base: parent.yaml\nmodel: {name: unet, base_width: 8}\n")
    assert load_config(tmp_path / "other.yaml")["model"] == {"name": "unet", "base_width": 8}  # replaced whole

    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_the_lite1_candidate_config_is_v6_with_the_deeper_encoder() -> None:
    from train.fit import load_config

    root = Path(__file__).resolve().parents[1] / "train" / "configs"
    v6, v7 = load_config(root / "busi_unet_v6.yaml"), load_config(root / "busi_unet_v7.yaml")
    changed = {key for key in v6 if v6[key] != v7[key]}
    assert changed == {"model", "pretrained"}
    assert {k for k in v6["model"] if v6["model"][k] != v7["model"][k]} == {"encoder"}


def test_the_sampling_candidate_config_moves_v6s_class_balance_from_the_loss_to_the_sampler() -> None:
    from train.fit import load_config

    root = Path(__file__).resolve().parents[1] / "train" / "configs"
    v6, v8 = load_config(root / "busi_unet_v6.yaml"), load_config(root / "busi_unet_v8.yaml")
    assert {key for key in v6 if v6[key] != v8[key]} == {"loss", "sampling_power"}
    assert {k for k in v6["loss"] if v6["loss"][k] != v8["loss"][k]} == {"class_weight_power"}
    # the same balance, applied once: v6's loss exponent becomes v8's sampling exponent
    assert (v6["sampling_power"], v6["loss"]["class_weight_power"]) == (0.0, 0.5)
    assert (v8["sampling_power"], v8["loss"]["class_weight_power"]) == (0.5, 0.0)
