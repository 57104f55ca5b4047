"""The network's shapes, the checkpoint round trip, and refusal of tampered or mismatched checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from busi_batch.errors import ModelLoadError
from busi_batch.model import MultiTaskUNet, UNetConfig, load_model
from conftest import make_tiny_checkpoint


@pytest.mark.parametrize("mask_pooling", [True, False])
def test_forward_shapes(mask_pooling: bool) -> None:
    net = MultiTaskUNet(UNetConfig(base_width=4, depth=3, mask_pooling=mask_pooling)).eval()
    seg, cls = net(torch.randn(2, 1, 64, 48))
    assert seg.shape == (2, 1, 64, 48) and cls.shape == (2, 3)


def test_every_conv_block_has_batch_norm() -> None:
    net = MultiTaskUNet(UNetConfig(base_width=4, depth=2))
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == len(norms) > 0


def test_backward_reaches_both_heads() -> None:
    net = MultiTaskUNet(UNetConfig(base_width=4, depth=2))
    seg, cls = net(torch.randn(2, 1, 32, 32))
    (seg.mean() + cls.mean()).backward()
    assert net.seg_head.weight.grad is not None and net.cls_head.mlp[0].weight.grad is not None


def test_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    weights = make_tiny_checkpoint(tmp_path / "m.pt", seed=3)
    a, b = load_model(weights), load_model(weights.with_suffix(".json"))
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(a.network(x)[0], b.network(x)[0])
    assert a.sha256 == a.card.weights_sha256 and a.card.test_model


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    weights = make_tiny_checkpoint(tmp_path / "m.pt")
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"m\.pt: sha256 .* does not match"):
        load_model(weights)


def test_weights_swapped_for_another_model_are_refused(tmp_path: Path) -> None:
    a = make_tiny_checkpoint(tmp_path / "a.pt", seed=1)
    b = make_tiny_checkpoint(tmp_path / "b.pt", seed=2)
    shutil.copy(b, a)
    with pytest.raises(ModelLoadError, match="does not match"):
        load_model(a)


def test_missing_card_and_bad_card(tmp_path: Path) -> None:
    weights = make_tiny_checkpoint(tmp_path / "m.pt")
    card = weights.with_suffix(".json")
    card.write_text("{not json")
    with pytest.raises(ModelLoadError, match="invalid model card"):
        load_model(weights)
    card.unlink()
    with pytest.raises(ModelLoadError, match="model card not found"):
        load_model(weights)
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "absent.pt")


def test_card_with_other_class_order_is_refused(tmp_path: Path) -> None:
    weights = make_tiny_checkpoint(tmp_path / "m.pt")
    card = json.loads(weights.with_suffix(".json").read_text())
    card["class_names"] = ["benign", "normal", "malignant"]
    weights.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="class order"):
        load_model(weights)


def test_pickle_payload_is_never_executed(tmp_path: Path) -> None:
    """weights_only=True: a checkpoint carrying code is refused, even when its hash is 'right'."""
    import hashlib
    import pickle

    class Evil:
        def __reduce__(self):  # noqa: D105
            return (print, ("owned",))

    weights = make_tiny_checkpoint(tmp_path / "m.pt")
    torch.save({"x": Evil()}, weights, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    card = json.loads(weights.with_suffix(".json").read_text())
    card["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    weights.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="cannot load weights"):
        load_model(weights)


def test_batch_norm_folded_for_inference_gives_the_same_outputs(tmp_path: Path) -> None:
    """load_model folds each BatchNorm into its convolution: none is left, and the outputs do not move."""
    import dataclasses

    from busi_batch.model import ModelCard, save_model

    torch.manual_seed(1)
    config = UNetConfig(base_width=4, depth=3)
    plain = MultiTaskUNet(config)
    with torch.no_grad():  # statistics far from the identity, so that folding has something to get wrong
        for m in plain.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.2, 3)
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
    card = ModelCard(name="folding", version="0", architecture=dataclasses.asdict(config), input_size=64,
                     test_model=True)
    save_model(plain, card, tmp_path / "m.pt")
    plain.load_state_dict({k: v.float() for k, v in torch.load(tmp_path / "m.pt", weights_only=True).items()})
    loaded = load_model(tmp_path / "m.pt")
    assert not [m for m in loaded.network.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    x = torch.randn(2, 1, 64, 64)
    with torch.inference_mode():
        seg_a, cls_a = plain.eval()(x)
        seg_b, cls_b = loaded.network(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(seg_a, seg_b, atol=1e-4) and torch.allclose(cls_a, cls_b, atol=1e-4)
    assert seg_a.abs().max() > 0.1  # not a trivially flat output


def test_unfoldable_network_runs_as_it_is() -> None:
    from busi_batch.model import fold_batch_norm

    class Branchy(torch.nn.Module):  # data-dependent control flow: torch.fx cannot trace it
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm = torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.conv(x)) if x.sum() > 0 else x

    net = Branchy().eval()
    assert fold_batch_norm(net) is net
