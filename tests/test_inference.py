"""Choosing the forward pass precision, bf16 against fp32, and predict's use of the decode gate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from busi_batch import loader, runtime
from busi_batch.discover import discover
from busi_batch.errors import UsageError
from busi_batch.inference import predict_images
from busi_batch.loader import DecodeGate
from busi_batch.model import load_model
from busi_batch.rows import settings_key
from busi_batch.runtime import select_precision

CPU = torch.device("cpu")


@pytest.mark.parametrize("flags,expected", [({"avx2"}, "fp32"), ({"avx2", "avx512_bf16"}, "bf16"),
                                            ({"amx_bf16", "amx_tile"}, "bf16"), (set(), "fp32")])
def test_auto_precision_is_bf16_only_with_native_support(
    flags: set[str], expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: frozenset(flags))
    assert select_precision("auto", CPU) == expected
    assert select_precision("fp32", CPU) == "fp32" and select_precision("bf16", CPU) == "bf16"


def test_unknown_precision_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="fp16"):
        select_precision("fp16", CPU)


def test_bf16_is_part_of_the_resume_settings_and_fp32_keeps_the_old_key(tiny_weights: Path) -> None:
    fp32, bf16 = load_model(tiny_weights, precision="fp32"), load_model(tiny_weights, precision="bf16")
    assert "precision" not in settings_key(fp32, False)  # folders written before the option still resume
    assert settings_key(bf16, False) == settings_key(fp32, False) + ";precision=bf16"


def test_bf16_forward_agrees_with_fp32_on_the_shipped_model(sample_study: Path) -> None:
    """Nearly the same class probabilities and lesion masks on the sample study, and the same class wherever fp32
    is not close to a tie. bf16 (its depthwise convolutions included) moves the default busi_unet_v6 more than v1:
    on the 156 test images the same class for 153, largest class-probability gap 0.11, mean mask Dice 0.962
    (``python benchmarks/precision_agreement.py --folds test``); on the sample study the largest probability gap
    is 0.038 and at most 5.1% of one image's lesion-map pixels change side of 0.5."""
    items = discover(sample_study).items
    runs = {}
    for precision in ("fp32", "bf16"):
        loaded = load_model(None, precision=precision)
        runs[precision] = list(predict_images(loaded, items, batch_size=4, workers=0, with_truth=False))
    for a, b in zip(runs["fp32"], runs["bf16"]):
        top_two = np.sort(a.probabilities)[-2:]
        if top_two[1] - top_two[0] >= 0.2:
            assert np.argmax(a.probabilities) == np.argmax(b.probabilities)
        assert np.abs(a.probabilities - b.probabilities).max() < 0.1
        assert np.mean((a.lesion_probability >= 0.5) != (b.lesion_probability >= 0.5)) < 0.06


def test_gate_is_used_on_cpu_with_workers_only(tiny_weights: Path, sample_study: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[DecodeGate] = []
    original = loader.DecodeGate

    def recording() -> DecodeGate:
        made.append(original())
        return made[-1]

    monkeypatch.setattr(loader, "DecodeGate", recording)
    items = discover(sample_study).items[:3]
    loaded = load_model(tiny_weights)
    assert len(list(predict_images(loaded, items, batch_size=2, workers=0))) == 3 and not made
    assert len(list(predict_images(loaded, items, batch_size=2, workers=1))) == 3 and len(made) == 1


def test_a_cards_class_bias_shifts_the_probabilities_and_names_itself_in_the_resume_key(tiny_weights: Path) -> None:
    """probabilities = softmax(logits / T + class_bias): a bias of log 4 on malignant multiplies its odds by 4
    against every other class; the resume key names the bias (old keys, without one, stay as they were)."""
    import dataclasses

    from busi_batch.inference import forward_probabilities

    plain = load_model(tiny_weights, precision="fp32")
    biased = dataclasses.replace(plain, card=dataclasses.replace(plain.card, class_bias=[0.0, 0.0, float(np.log(4))]))
    batch = torch.randn(3, 1, plain.card.input_size, plain.card.input_size, generator=torch.Generator().manual_seed(0))
    p, lesion = forward_probabilities(plain, batch)
    q, lesion_biased = forward_probabilities(biased, batch)
    odds = (q[:, 2] / q[:, :2].T) / (p[:, 2] / p[:, :2].T)
    assert torch.allclose(odds, torch.full_like(odds, 4.0), rtol=1e-4)
    assert torch.equal(lesion, lesion_biased)  # the mask is not the class head's business
    assert "class_bias" not in settings_key(plain, False)
    assert settings_key(biased, False) == settings_key(plain, False) + ";class_bias=0,0,1.38629"
    with pytest.raises(ValueError, match="3 classes"):
        dataclasses.replace(plain.card, class_bias=[1.0, 0.0])
