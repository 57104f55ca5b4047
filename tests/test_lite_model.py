"""The pretrained-encoder model (the architecture of busi_unet_v2, v3, v4 and v6): weight mapping, geometry,
training, loading."""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from busi_batch.encoder import (  # noqa: E402
    ENCODERS, GREY_MEAN, GREY_STD, IMAGENET_MEAN, IMAGENET_STD, LiteEncoder, weights_from_reference,
)
from busi_batch.metrics import dice_score  # noqa: E402
from busi_batch.model import (  # noqa: E402
    ARCHITECTURES, LiteUNetConfig, ModelCard, MultiTaskLiteUNet, build_network, ensemble_of, load_model,
    save_model,
)
from busi_batch.postprocess import MaskRules, lesion_mask, probability_to_size  # noqa: E402
from busi_batch.preprocess import letterbox_box, model_input, resize_square  # noqa: E402

#: Largest absolute difference allowed between our encoder's ImageNet logits and the reference package's (the
#: logits span about +-10; float32 summation order differs between the two implementations).
LOGIT_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference_state() -> dict[str, torch.Tensor]:
    from train.fit import reference_encoder_state

    return reference_encoder_state("efficientnet-lite0")


def imagenet_input(seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    x = torch.rand(2, 3, 224, 224)
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_mapped_weights_give_the_reference_imagenet_logits(name: str) -> None:
    from efficientnet_lite_pytorch import EfficientNet

    from train.fit import reference_encoder_state

    reference_state = reference_encoder_state(name)
    # the reference pads for a fixed image size (240 for Lite1); ours pads for the input it gets (TF "same"), so the
    # reference is built for the 224 x 224 test input
    reference = EfficientNet.from_name(name, image_size=224).eval()
    reference.load_state_dict(reference_state)
    ours = LiteEncoder(in_channels=3, stages=ENCODERS[name]).eval()
    ours.load_state_dict(weights_from_reference(reference_state, in_channels=3))  # strict: every tensor mapped
    x = imagenet_input()
    with torch.no_grad():
        expected = reference(x)
        pooled = ours(x)[-1].mean(dim=(2, 3))
        logits = F.linear(pooled, reference_state["_fc.weight"], reference_state["_fc.bias"])
    assert expected.abs().max() > 1.0  # a real, non-degenerate answer
    assert (logits - expected).abs().max().item() < LOGIT_TOLERANCE
    assert torch.equal(logits.argmax(dim=1), expected.argmax(dim=1))


def test_the_grey_stem_sees_a_grey_image_as_the_rgb_stem_sees_it_replicated(
    reference_state: dict[str, torch.Tensor],
) -> None:
    rgb = LiteEncoder(in_channels=3).eval()
    rgb.load_state_dict(weights_from_reference(reference_state, in_channels=3))
    grey = LiteEncoder(in_channels=1).eval()
    grey.load_state_dict(weights_from_reference(reference_state, in_channels=1))
    torch.manual_seed(1)
    image = torch.rand(1, 1, 224, 224)
    as_rgb = (image.repeat(1, 3, 1, 1) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        a = rgb(as_rgb)[-1].mean(dim=(2, 3))
        b = grey((image - GREY_MEAN) / GREY_STD)[-1].mean(dim=(2, 3))
    # the same but for the border, where both pad zeros in their own normalisation
    assert F.cosine_similarity(a, b).item() > 0.999
    assert torch.equal(a.argmax(dim=1), b.argmax(dim=1))


@pytest.mark.parametrize(("name", "blocks"), [("efficientnet-lite0", 16), ("efficientnet-lite1", 21)])
def test_encoder_features_have_the_documented_strides_and_channels(name: str, blocks: int) -> None:
    encoder = LiteEncoder(in_channels=1, stages=ENCODERS[name])
    assert len(encoder.blocks) == blocks
    features = encoder(torch.zeros(1, 1, 64, 96))
    assert [f.shape[1] for f in features] == encoder.channels == [16, 24, 40, 112, 320, 1280]
    assert [tuple(f.shape[-2:]) for f in features] == [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3), (2, 3)]


def test_lite_unet_shapes_and_both_heads_get_gradients() -> None:
    net = MultiTaskLiteUNet(LiteUNetConfig())
    seg, cls = net(torch.randn(2, 1, 64, 64))
    assert seg.shape == (2, 1, 64, 64) and cls.shape == (2, 3)
    (seg.mean() + cls.mean()).backward()
    assert net.seg_head.weight.grad is not None and net.cls_head.mlp[-1].weight.grad is not None
    assert net.encoder.stem.conv.weight.grad is not None


def test_unknown_architecture_is_refused_with_the_valid_names() -> None:
    with pytest.raises(ValueError, match="lite_unet"):
        build_network({"name": "transformer"})
    with pytest.raises(ValueError, match="efficientnet-lite1"):
        LiteUNetConfig(encoder="efficientnet-b7")
    assert set(ARCHITECTURES) == {"unet", "lite_unet", "ensemble"}


def test_ensemble_averages_its_members_logits_and_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    """The ensemble's output is the members' mean logits, and its card alone rebuilds it (members included)."""
    torch.manual_seed(0)
    members = [MultiTaskLiteUNet(LiteUNetConfig(decoder_widths=(16, 8, 8, 8))).eval() for _ in range(2)]
    ensemble = ensemble_of(members)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        outputs = [m(x) for m in members]
        seg, cls = ensemble(x)
    assert torch.allclose(seg, (outputs[0][0] + outputs[1][0]) / 2, atol=1e-6)
    assert torch.allclose(cls, (outputs[0][1] + outputs[1][1]) / 2, atol=1e-6)
    assert not torch.allclose(outputs[0][1], outputs[1][1])  # two different members, not one counted twice
    card = ModelCard(name="ens-test", version="0", architecture=dataclasses.asdict(ensemble.config), input_size=64,
                     input_geometry="letterbox", test_model=True)
    save_model(ensemble, card, tmp_path / "ens.pt")
    loaded = load_model(tmp_path / "ens.pt")
    assert loaded.card.architecture_name() == "ensemble" and len(loaded.card.architecture["members"]) == 2
    with torch.no_grad():
        got = loaded.network(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(got[0], seg, atol=1e-4) and torch.allclose(got[1], cls, atol=1e-4)


def test_an_ensemble_needs_two_plain_members() -> None:
    lite = dataclasses.asdict(LiteUNetConfig())
    with pytest.raises(ValueError, match="at least two"):
        build_network({"name": "ensemble", "members": [lite]})
    nested = {"name": "ensemble", "members": [lite, lite]}
    with pytest.raises(ValueError, match="itself be an ensemble"):
        build_network({"name": "ensemble", "members": [nested, lite]})


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
def test_lite_checkpoint_round_trip_and_folded_outputs_match(tmp_path: Path, encoder: str) -> None:
    torch.manual_seed(0)
    net = MultiTaskLiteUNet(LiteUNetConfig(encoder=encoder)).eval()
    card = ModelCard(name="lite-test", version="0", architecture=dataclasses.asdict(net.config), input_size=64,
                     input_geometry="letterbox", test_model=True)
    save_model(net, card, tmp_path / "lite.pt")
    loaded = load_model(tmp_path / "lite.pt")
    assert loaded.card.architecture_name() == "lite_unet"
    assert loaded.card.architecture["encoder"] == encoder
    assert loaded.card.mask_rules().letterbox
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        expected = net(x)
        got = loaded.network(x.contiguous(memory_format=torch.channels_last))
    for a, b in zip(expected, got):
        assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize(("name", "architecture", "geometry"), [
    ("busi_unet_v1", "unet", "squash"), ("busi_unet_v2", "lite_unet", "letterbox"),
    ("busi_unet_v3", "lite_unet", "letterbox"), ("busi_unet_v4", "lite_unet", "letterbox"),
    ("busi_unet_v5", "ensemble", "letterbox"), ("busi_unet_v6", "lite_unet", "letterbox"),
])
def test_every_shipped_checkpoint_loads_with_its_card(name: str, architecture: str, geometry: str) -> None:
    """v1 (plain U-Net), v2, v3, v4, the default v6 (Lite0 U-Nets) and v5 (two Lite0 U-Nets) all load, pass the
    card's sha256 check, and say which architecture they are."""
    loaded = load_model(Path(__file__).resolve().parent.parent / "busi_batch" / "weights" / f"{name}.pt")
    assert loaded.card.name == name and loaded.sha256 == loaded.card.weights_sha256
    assert loaded.card.architecture_name() == architecture and loaded.card.input_geometry == geometry
    with torch.no_grad():
        seg, cls = loaded.network(torch.zeros(1, 1, 256, 256).contiguous(memory_format=torch.channels_last))
    assert seg.shape == (1, 1, 256, 256) and cls.shape == (1, 3)


# --------------------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize(("h", "w", "box"), [(100, 200, (16, 0, 32, 64)), (200, 100, (0, 16, 64, 32)),
                                              (64, 64, (0, 0, 64, 64)), (3, 1000, (31, 0, 1, 64))])
def test_letterbox_box_keeps_the_aspect_ratio_centred(h: int, w: int, box: tuple[int, int, int, int]) -> None:
    assert letterbox_box(h, w, 64) == box


def test_letterboxed_input_pads_with_black_and_keeps_the_shape() -> None:
    image = np.full((50, 100), 200, dtype=np.uint8)
    square = resize_square(image, 64, "letterbox")
    assert square.shape == (64, 64)
    assert (square[:16] == 0).all() and (square[48:] == 0).all() and (square[16:48] == 200).all()
    x = model_input(image, 64, 0.5, 0.25, "letterbox")
    assert x[0, 0] == pytest.approx(-2.0) and x[32, 32] == pytest.approx((200 / 255 - 0.5) / 0.25, abs=1e-5)
    with pytest.raises(ValueError, match="letterbox"):
        resize_square(image, 64, "stretch")


def test_a_letterboxed_probability_maps_back_onto_the_image() -> None:
    """A lesion drawn on a wide image, letterboxed, comes back at the same place at the image's size."""
    truth = np.zeros((120, 240), dtype=np.float32)
    truth[40:80, 100:180] = 1.0
    probability = resize_square(truth, 64, "letterbox")
    back = probability_to_size(probability, 120, 240, letterbox=True) >= 0.5
    assert dice_score(back, truth > 0) > 0.95
    squashed_reading = probability_to_size(probability, 120, 240, letterbox=False) >= 0.5
    assert dice_score(squashed_reading, truth > 0) < 0.8  # the geometry matters
    rules = MaskRules(letterbox=True)
    assert np.array_equal(lesion_mask(probability, 120, 240, "benign", rules), back)
    assert rules.key().endswith(";letterbox=1") and "letterbox" not in MaskRules().key()


# --------------------------------------------------------------------------------------------- training
def test_one_training_step_on_cpu_moves_decoder_and_encoder_but_not_the_frozen_blocks(tmp_path: Path) -> None:
    from train.fit import DEFAULTS, Trainer, init_network, merge, parameter_groups, select_folds

    config = copy.deepcopy(merge(DEFAULTS, {
        "size": 64, "geometry": "letterbox", "normalisation": {"mean": GREY_MEAN, "std": GREY_STD},
        "model": {"name": "lite_unet"}, "pretrained": "efficientnet-lite0", "freeze_blocks": 3,
        "encoder_lr_ratio": 0.2, "precision": "bf16", "batch_size": 4, "threads": 1,
    }))
    model = init_network(config)
    groups = parameter_groups(model, 1e-3, 0.2)
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(2e-4)]
    assert not any(p.requires_grad for p in model.encoder.stem.parameters())
    assert all(p.requires_grad for p in model.encoder.blocks[3].parameters())

    rng = np.random.default_rng(0)
    n = 8
    arrays = {"images": rng.integers(0, 255, (n, 64, 64), dtype=np.uint8),
              "masks": np.zeros((n, 64, 64), dtype=np.uint8), "labels": np.arange(n) % 3,
              "rel": np.array([f"x{k}.png" for k in range(n)])}
    arrays["masks"][:, 20:40, 20:40] = 1
    import pandas as pd

    split = pd.DataFrame({"image": arrays["rel"], "fold": ["1"] * 6 + ["0"] * 2})
    trainer = Trainer(config, select_folds(arrays, split, "0"), tmp_path)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    optimizer = torch.optim.AdamW(parameter_groups(trainer.model, 1e-3, 0.2), lr=1e-3)
    trainer.step(optimizer, np.arange(4), {"seg_weight": 1.0, "class_weight": 1.0})
    after = trainer.model.state_dict()
    moved = {k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])}
    assert "seg_head.weight" in moved and "cls_head.mlp.3.weight" in moved
    assert "encoder.blocks.3.depthwise.conv.weight" in moved and "encoder.head.conv.weight" in moved
    assert "encoder.stem.conv.weight" not in moved and "encoder.blocks.2.project.conv.weight" not in moved
    assert all(v.dtype == torch.float32 for k, v in after.items() if v.is_floating_point())
