"""The batched forward pass: decoded batches in, whole batches of predictions out, in the items' order.

Every entry point (``run``, the benchmark, the demo, training's evaluation) feeds :func:`predict`, so they all see
the same decode -> preprocess -> forward path (decoding: :mod:`busi_batch.loader`). A file that cannot be decoded
comes out as a :class:`Prediction` with ``error`` set, in its place in its batch; it never stops the batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .discover import ImageItem
from .loader import DecodedBatch, StudyLoader
from .model import LoadedModel
from .runtime import tune_cpu_allocator


@dataclass(frozen=True)
class Prediction:
    """The network's raw answer for one image: class probabilities and a low-resolution lesion probability.

    ``index`` is the item's position in the sequence given to :func:`predict`; ``height`` and ``width`` are the
    image's own size. A file that could not be decoded has ``error`` set and no probabilities.
    """

    index: int
    input_sha256: str
    height: int
    width: int
    probabilities: np.ndarray | None = None
    lesion_probability: np.ndarray | None = None
    truth_mask: np.ndarray | None = None
    truth_error: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class PredictionBatch:
    """The predictions of one batch of consecutive items, in the items' order."""

    predictions: tuple[Prediction, ...]

    def __iter__(self) -> Iterator[Prediction]:
        return iter(self.predictions)

    def __len__(self) -> int:
        return len(self.predictions)


@torch.inference_mode()
def forward_probabilities(
    loaded: LoadedModel, batch: torch.Tensor, tta: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities (B, K) and lesion probabilities (B, S, S) for a normalised batch (B, 1, S, S).

    The class logits are divided by the card's temperature and shifted by its ``class_bias`` (if any) before the
    softmax. With ``tta`` the horizontally flipped image is also run and the probabilities averaged.
    """
    network = loaded.network
    device = next(network.parameters()).device
    use_amp = loaded.precision == "bf16"
    batch = batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    views = [batch, torch.flip(batch, dims=[3])] if tta else [batch]
    bias = torch.tensor(loaded.card.class_bias, dtype=torch.float32, device=device) if loaded.card.class_bias else 0.0
    class_probs, lesion_probs = [], []
    for k, view in enumerate(views):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            seg_logits, class_logits = network(view)
        seg = torch.sigmoid(seg_logits.float())[:, 0]
        lesion_probs.append(torch.flip(seg, dims=[2]) if k else seg)
        class_probs.append(torch.softmax(class_logits.float() / loaded.card.temperature + bias, dim=1))
    return torch.stack(class_probs).mean(0), torch.stack(lesion_probs).mean(0)


def predict(
    loaded: LoadedModel,
    items: Sequence[ImageItem],
    batch_size: int = 16,
    workers: int = 0,
    tta: bool = False,
    with_truth: bool = True,
) -> Iterator[PredictionBatch]:
    """Yield one :class:`PredictionBatch` per ``batch_size`` consecutive items (the last may hold fewer), in order.

    ``workers`` decoding processes (0: decode in this process), started by the thread that iterates, which must
    live as long as the iteration (:class:`~busi_batch.loader.StudyLoader`). They stop when the iteration ends,
    however it ends; close the iterator (``contextlib.closing``) to stop them at once when leaving early. A worker
    that dies mid-run raises :class:`~busi_batch.errors.DecodingWorkerDied`. With ``with_truth`` each prediction
    carries the item's ground-truth mask at the image's size.
    """
    device = next(loaded.network.parameters()).device
    study = StudyLoader(items, loaded.card, batch_size=batch_size, workers=workers, device=device,
                        with_truth=with_truth)
    if device.type == "cpu":
        tune_cpu_allocator()
    with closing(study):  # the workers stop when this generator does, however it does; then the gate is released
        for decoded in study:
            probs = masks = None
            if decoded.stacked is not None:
                with study.network_running():
                    class_probs, lesion_probs = forward_probabilities(loaded, decoded.stacked, tta=tta)
                    probs, masks = class_probs.cpu().numpy(), lesion_probs.cpu().numpy()
            yield _batch_of_predictions(decoded, probs, masks)


def _batch_of_predictions(
    decoded: DecodedBatch, probs: np.ndarray | None, masks: np.ndarray | None
) -> PredictionBatch:
    """Each sample with its row of ``probs`` and ``masks`` (which hold the decodable samples only, in order)."""
    predictions, k = [], 0
    for s in decoded.samples:
        probabilities = lesion = None
        if s.error is None:
            probabilities, lesion, k = probs[k], masks[k], k + 1
        predictions.append(Prediction(
            index=s.index, input_sha256=s.input_sha256, height=s.height, width=s.width,
            probabilities=probabilities, lesion_probability=lesion,
            truth_mask=s.truth_mask, truth_error=s.truth_error, error=s.error,
        ))
    return PredictionBatch(tuple(predictions))


def predict_images(loaded: LoadedModel, items: Sequence[ImageItem], **options: Any) -> Iterator[Prediction]:
    """:func:`predict` (the same ``options``), one :class:`Prediction` at a time, in the items' order, for callers
    that score images one by one. Closing this iterator closes :func:`predict`'s."""
    with closing(predict(loaded, items, **options)) as batches:
        for batch in batches:
            yield from batch.predictions
