"""Losses for the two heads.

Mask: soft Dice + BCE with ``pos_weight``. Dice optimises overlap directly and ignores the large background;
BCE gives every pixel a gradient (Dice alone is unstable early and on small lesions) and is what teaches the
network that an empty mask, as on every normal image, is a valid answer. Dice is computed over the whole batch
(all pixels pooled), so an all-normal batch does not divide by zero and normal images still penalise false
positives through the denominator.

Class: cross-entropy with class weights (BUSI is 56% benign) and light label smoothing (labels are noisy: the
dataset contains near-duplicates filed under two classes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice over the whole batch; ~0 for a perfect confident prediction, ~1 for a disjoint one."""
    prob = torch.sigmoid(logits.float())
    target = target.float()
    intersection = (prob * target).sum()
    return 1.0 - (2.0 * intersection + eps) / (prob.sum() + target.sum() + eps)


class SegmentationLoss(nn.Module):
    """``dice_weight * soft Dice + bce_weight * BCE(pos_weight)`` for (B,1,H,W) logits and 0/1 targets."""

    def __init__(self, pos_weight: float = 2.0, dice_weight: float = 1.0, bce_weight: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("pos_weight", torch.tensor([pos_weight]))
        self.dice_weight, self.bce_weight = dice_weight, bce_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(logits.float(), target.float(), pos_weight=self.pos_weight)
        return self.dice_weight * soft_dice_loss(logits, target) + self.bce_weight * bce


def class_weights(labels: Sequence[int], num_classes: int, power: float = 0.5) -> torch.Tensor:
    """Weights ``(n / (k * count)) ** power``, renormalised to mean 1; power 0.5 softens full inverse frequency,
    which would over-correct on 133 normal images."""
    counts = torch.bincount(torch.as_tensor(labels, dtype=torch.long), minlength=num_classes).float().clamp(min=1)
    weights = (counts.sum() / (num_classes * counts)) ** power
    return weights / weights.mean()


class ClassificationLoss(nn.Module):
    """Cross-entropy with class weights and label smoothing."""

    def __init__(self, weights: torch.Tensor | None = None, label_smoothing: float = 0.05) -> None:
        super().__init__()
        self.register_buffer("weights", weights if weights is not None else torch.empty(0))
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = self.weights if self.weights.numel() else None
        return F.cross_entropy(logits.float(), target, weight=weight, label_smoothing=self.label_smoothing)
