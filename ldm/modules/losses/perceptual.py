"""LPIPS perceptual distance (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features
as a Perceptual Metric") with two frozen backbones.

    d(x, x0) = sum_l  mean_hw  || w_l * (f_l(x) - f_l(x0)) ||^2,   f_l = unit-normalised features

* `LPIPS` ("vgg16"): the paper's metric as CompVis uses it (taming-transformers `lpips.py`); the
  module tree and state-dict keys are taming's (`scaling_layer.shift`, `net.slice1.0.weight`,
  `lin0.model.1.weight`, ...), so `loss.perceptual_loss.*` of CompVis autoencoder checkpoints load.
  The VGG16 ImageNet backbone comes from a torchvision-format file (`features.N.weight`) and the
  learned heads w_l from the `lpips` package's `weights/v0.1/vgg.pth`.
* `EfficientNetLPIPS` ("efficientnet_lite0"): the same recipe on the five stages of the
  pretrained EfficientNet-Lite0 that ships in a pip package, so it runs offline. No learned heads
  exist for it, so w_l = 1 (LPIPS's `lin=False` "baseline" variant: squared differences summed
  over channels).

Both take images in [-1, 1] and return (B, 1, 1, 1). They are frozen: no parameter requires
grad, and `train()` keeps them in eval mode (so BatchNorm statistics never move and the heads'
dropout never fires).
"""
from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ldm.config import ConfigError, LossConfig
from ldm.modules.losses.efficientnet import (
    FEATURE_CHANNELS,
    LITE_MEAN,
    LITE_STD,
    EfficientNetLite0,
    load_efficientnet_lite0,
)

logger = logging.getLogger(__name__)

# taming's constants: ImageNet mean/std for [-1, 1] inputs (shift = 2 mean - 1, scale = 2 std).
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)

# torchvision `vgg16().features`: channel counts, "M" = 2x2 max-pool; the last pool is unused.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Layer-index ranges of the five slices, ending after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
VGG16_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
VGG16_CHANNELS = (64, 128, 256, 512, 512)

BACKBONES = ("efficientnet_lite0", "vgg16")


def normalize_tensor(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit-normalise (B, C, H, W) features along C (the paper's f-hat)."""
    return x / (torch.sqrt(torch.sum(x**2, dim=1, keepdim=True)) + eps)


def spatial_average(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, 1, 1)."""
    return x.mean(dim=(2, 3), keepdim=True)


class ScalingLayer(nn.Module):
    """Map [-1, 1] images to a backbone's input normalisation: (x - shift) / scale."""

    def __init__(self, shift: Sequence[float], scale: Sequence[float]):
        super().__init__()
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.float32)[None, :, None, None])
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32)[None, :, None, None])

    @classmethod
    def from_mean_std(cls, mean: Sequence[float], std: Sequence[float]) -> ScalingLayer:
        """From a [0, 1]-image mean/std: ((x + 1) / 2 - mean) / std = (x - (2 mean - 1)) / 2 std."""
        return cls([2 * m - 1 for m in mean], [2 * s for s in std])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class NetLinLayer(nn.Module):
    """The learned per-channel weights w_l: dropout then a 1x1 conv to one channel, no bias."""

    def __init__(self, chn_in: int, chn_out: int = 1, use_dropout: bool = True):
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout()] if use_dropout else []
        layers.append(nn.Conv2d(chn_in, chn_out, 1, stride=1, padding=0, bias=False))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class VGG16Features(nn.Module):
    """VGG16 conv layers split after relu1_2 .. relu5_3; children keep torchvision's indices
    (`slice2.5` is `features.5`)."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for item in VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_ch, item, 3, padding=1), nn.ReLU(inplace=True)]
                in_ch = item
        for n, (start, stop) in enumerate(VGG16_SLICES, start=1):
            block = nn.Sequential()
            for i in range(start, stop):
                block.add_module(str(i), layers[i])
            setattr(self, f"slice{n}", block)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> relu1_2 .. relu5_3 maps, channels `VGG16_CHANNELS`, strides 1..16."""
        feats = []
        for n in range(1, len(VGG16_SLICES) + 1):
            x = getattr(self, f"slice{n}")(x)
            feats.append(x)
        return feats


def vgg16_slices_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision vgg16 keys (`features.N.weight`) -> `VGG16Features` keys (`sliceK.N.weight`).

    A state dict already in LPIPS form (`net.sliceK.N.weight`, as in taming's LPIPS files) is
    accepted too. Classifier keys are ignored.
    """
    out = {}
    for key, value in state.items():
        if key.startswith("net.slice"):
            out[key[len("net."):]] = value
        elif key.startswith("features."):
            _, index, name = key.split(".")
            n = next(k for k, (a, b) in enumerate(VGG16_SLICES, 1) if a <= int(index) < b)
            out[f"slice{n}.{index}.{name}"] = value
    return out


def lpips_package_heads() -> Path | None:
    """`lpips/weights/v0.1/vgg.pth` of an installed `lpips` package (found without importing it,
    since `import lpips` needs torchvision)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "weights" / "v0.1" / "vgg.pth"
    return path if path.is_file() else None


def _load(path: str | Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


class _FrozenPerceptual(nn.Module):
    """Common frozen behaviour: no grads, always in eval mode."""

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad = False
        self.eval()

    def train(self, mode: bool = True) -> _FrozenPerceptual:
        # A parent's .train() must not switch on the heads' dropout or BatchNorm updates.
        return super().train(False)


class LPIPS(_FrozenPerceptual):
    """VGG16 LPIPS with taming's module names. inputs (B, 3, H, W) in [-1, 1] -> (B, 1, 1, 1).

    vgg16_weights: torchvision-format `vgg16` state dict (ImageNet); None leaves the backbone
        random (e.g. to be filled by a CompVis checkpoint) and logs a warning.
    lpips_heads: file with `lin0.model.1.weight` .. `lin4...`; None uses the `lpips` package's
        file when installed, else the heads stay random with a warning.
    """

    def __init__(
        self,
        vgg16_weights: str | Path | None = None,
        lpips_heads: str | Path | None = None,
        use_dropout: bool = True,
    ):
        super().__init__()
        self.scaling_layer = ScalingLayer(LPIPS_SHIFT, LPIPS_SCALE)
        self.chns = list(VGG16_CHANNELS)
        self.net = VGG16Features()
        for i, ch in enumerate(self.chns):
            setattr(self, f"lin{i}", NetLinLayer(ch, use_dropout=use_dropout))
        if not any(p.is_meta for p in self.parameters()):  # built empty: a checkpoint fills it
            self.load_backbone(vgg16_weights)
            self.load_heads(lpips_heads if lpips_heads is not None else lpips_package_heads())
        self._freeze()

    def load_backbone(self, path: str | Path | None) -> None:
        if path is None:
            logger.warning("LPIPS: VGG16 backbone is random (no vgg16_weights given); "
                           "load a checkpoint that contains it before training")
            return
        state = vgg16_slices_state(_load(path))
        self.net.load_state_dict(state, strict=True)

    def load_heads(self, path: str | Path | None) -> None:
        if path is None:
            logger.warning("LPIPS: linear heads are random (no lpips_heads file and no `lpips` "
                           "package installed)")
            return
        state = _load(path)
        heads = {k: v for k, v in state.items() if k.startswith("lin")}
        expected = {k for k in self.state_dict() if k.startswith("lin")}
        if set(heads) != expected:
            raise KeyError(f"{path}: expected LPIPS head keys {sorted(expected)}, "
                           f"found {sorted(heads)}")
        self.load_state_dict(heads, strict=False)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        feats0 = self.net(self.scaling_layer(input))
        feats1 = self.net(self.scaling_layer(target))
        val = 0
        for i, (f0, f1) in enumerate(zip(feats0, feats1, strict=True)):
            diff = (normalize_tensor(f0) - normalize_tensor(f1)) ** 2
            val = val + spatial_average(getattr(self, f"lin{i}")(diff))
        return val


class EfficientNetLPIPS(_FrozenPerceptual):
    """LPIPS recipe on pretrained EfficientNet-Lite0 stages, uniform channel weights.

    inputs (B, 3, H, W) in [-1, 1] -> (B, 1, 1, 1). Stages: strides 2, 4, 8, 16, 32 with
    16, 24, 40, 112, 320 channels. No learned heads exist for this backbone, so each stage's
    unit-normalised squared difference is summed over channels (LPIPS `lin=False`); each stage
    then contributes at most 4. The scaling layer maps [-1, 1] to the normalisation the Lite
    weights were trained with ((255 x01 - 127) / 128), not to the ImageNet mean/std.
    State-dict keys: `scaling_layer.shift/scale`, `net.<lukemelas EfficientNet keys>` (no head).
    """

    def __init__(self, pretrained: bool = True):
        super().__init__()
        self.scaling_layer = ScalingLayer.from_mean_std(LITE_MEAN, LITE_STD)
        self.chns = list(FEATURE_CHANNELS)
        self.net = (
            load_efficientnet_lite0(include_top=False)
            if pretrained
            else EfficientNetLite0(include_top=False)
        )
        self._freeze()

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        feats0 = self.net.features(self.scaling_layer(input))
        feats1 = self.net.features(self.scaling_layer(target))
        val = 0
        for f0, f1 in zip(feats0, feats1, strict=True):
            diff = (normalize_tensor(f0) - normalize_tensor(f1)) ** 2
            val = val + spatial_average(diff.sum(dim=1, keepdim=True))
        return val


def build_perceptual_loss(cfg: LossConfig) -> nn.Module:
    """The frozen perceptual distance named by `cfg.perceptual_backbone`."""
    if cfg.perceptual_backbone == "vgg16":
        return LPIPS(vgg16_weights=cfg.vgg16_weights, lpips_heads=cfg.lpips_heads)
    if cfg.perceptual_backbone == "efficientnet_lite0":
        return EfficientNetLPIPS()
    raise ConfigError(
        f"perceptual_backbone: {cfg.perceptual_backbone!r} is not one of {list(BACKBONES)}"
    )
