"""LPIPS (VGG16, taming's keys) and the EfficientNet-Lite0 variant: metric properties, weight
loading, and values against references written here from the paper's formula."""
import dataclasses
import importlib.util
from pathlib import Path

import pytest
import skimage.data
import torch
import torch.nn.functional as F

from ldm.config import ConfigError, LossConfig
from ldm.modules.losses.perceptual import (
    LPIPS,
    EfficientNetLPIPS,
    build_perceptual_loss,
)

# torchvision vgg16().features: index of each conv and its (out, in) channels.
VGG16_CONVS = {
    0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256),
    14: (256, 256), 17: (512, 256), 19: (512, 512), 21: (512, 512), 24: (512, 512),
    26: (512, 512), 28: (512, 512),
}
POOLS = (4, 9, 16, 23)  # max-pools inside the used layers (0..29)
SLICE_OF = {i: 1 + sum(i > b for b in (3, 8, 15, 22)) for i in VGG16_CONVS}
LPIPS_HEADS = Path(importlib.util.find_spec("lpips").submodule_search_locations[0]) / (
    "weights/v0.1/vgg.pth")


def taming_lpips_keys() -> dict[str, tuple[int, ...]]:
    """State-dict keys and shapes of taming's LPIPS(): scaling_layer, net.sliceK, lin0..lin4."""
    keys = {"scaling_layer.shift": (1, 3, 1, 1), "scaling_layer.scale": (1, 3, 1, 1)}
    for i, (c_out, c_in) in VGG16_CONVS.items():
        keys[f"net.slice{SLICE_OF[i]}.{i}.weight"] = (c_out, c_in, 3, 3)
        keys[f"net.slice{SLICE_OF[i]}.{i}.bias"] = (c_out,)
    for k, ch in enumerate((64, 128, 256, 512, 512)):
        keys[f"lin{k}.model.1.weight"] = (1, ch, 1, 1)
    return keys


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory) -> Path:
    """A torchvision-format vgg16 state dict with random weights (no real ones exist offline)."""
    gen = torch.Generator().manual_seed(1)
    state = {}
    for i, (c_out, c_in) in VGG16_CONVS.items():
        state[f"features.{i}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=gen) * (
            2 / (9 * c_in)) ** 0.5
        state[f"features.{i}.bias"] = torch.randn(c_out, generator=gen) * 0.01
    state["classifier.0.weight"] = torch.randn(8, 8, generator=gen)  # ignored by LPIPS
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def vgg_lpips(vgg_file):
    return LPIPS(vgg16_weights=vgg_file, lpips_heads=LPIPS_HEADS)


@pytest.fixture(scope="module")
def eff_lpips():
    return EfficientNetLPIPS()


def cat_image(size: int = 64) -> torch.Tensor:
    """(1, 3, size, size) photo in [-1, 1]."""
    img = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1).float()[None] / 127.5 - 1
    return F.interpolate(img, size=(size, size), mode="bilinear", antialias=True)


def unit(f: torch.Tensor) -> torch.Tensor:
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)


def reference_vgg_lpips(state, heads, x, y):
    """The paper's LPIPS computed functionally from the raw weight files."""
    shift = torch.tensor([-0.030, -0.088, -0.188])[:, None, None]
    scale = torch.tensor([0.458, 0.448, 0.450])[:, None, None]

    def feats(h):
        h = (h - shift) / scale
        out = []
        for i in range(30):
            if i in VGG16_CONVS:
                h = F.relu(F.conv2d(h, state[f"features.{i}.weight"], state[f"features.{i}.bias"],
                                    padding=1))
            elif i in POOLS:
                h = F.max_pool2d(h, 2)
            if i in (3, 8, 15, 22, 29):
                out.append(h)
        return out

    total = 0
    for k, (a, b) in enumerate(zip(feats(x), feats(y), strict=True)):
        w = heads[f"lin{k}.model.1.weight"].flatten()
        total = total + ((unit(a) - unit(b)) ** 2 * w[:, None, None]).sum(1).mean((1, 2))
    return total


def test_vgg_lpips_keys_equal_taming(vgg_lpips):
    got = {k: tuple(v.shape) for k, v in vgg_lpips.state_dict().items()}
    assert list(got) == list(taming_lpips_keys())
    assert got == taming_lpips_keys()


def test_vgg_weights_loaded_from_files(vgg_lpips, vgg_file):
    state = torch.load(vgg_file, weights_only=True)
    sd = vgg_lpips.state_dict()
    for i in VGG16_CONVS:
        torch.testing.assert_close(sd[f"net.slice{SLICE_OF[i]}.{i}.weight"],
                                   state[f"features.{i}.weight"], rtol=0, atol=0)
    heads = torch.load(LPIPS_HEADS, map_location="cpu", weights_only=True)
    assert len(heads) == 5
    for k, v in heads.items():
        torch.testing.assert_close(sd[k], v, rtol=0, atol=0)


def test_vgg_lpips_matches_reference(vgg_lpips, vgg_file):
    state = torch.load(vgg_file, weights_only=True)
    heads = torch.load(LPIPS_HEADS, map_location="cpu", weights_only=True)
    x = cat_image(32)
    y = (x + 0.2 * torch.randn_like(x)).clamp(-1, 1)
    with torch.no_grad():
        got = vgg_lpips(x, y)
    assert got.shape == (1, 1, 1, 1)
    torch.testing.assert_close(got.flatten(), reference_vgg_lpips(state, heads, x, y))


def test_efficientnet_lpips_matches_reference(eff_lpips):
    x = cat_image(64)
    y = (x + 0.1 * torch.randn_like(x)).clamp(-1, 1)
    net = eff_lpips.net

    def feats(img):  # [-1, 1] -> (255 * x01 - 127) / 128, the Lite models' input
        return net.features((255 * (img + 1) / 2 - 127) / 128)

    with torch.no_grad():
        got = eff_lpips(x, y)
        ref = sum(((unit(a) - unit(b)) ** 2).sum(1).mean((1, 2))
                  for a, b in zip(feats(x), feats(y), strict=True))
    torch.testing.assert_close(got.flatten(), ref)


@pytest.mark.parametrize("which", ["vgg", "eff"])
def test_metric_properties(which, vgg_lpips, eff_lpips):
    model = vgg_lpips if which == "vgg" else eff_lpips
    size = 32 if which == "vgg" else 64
    x = cat_image(size).repeat(2, 1, 1, 1)
    noise = torch.randn_like(x)
    with torch.no_grad():
        d0 = model(x, x).flatten()
        d = [model(x, (x + s * noise).clamp(-1, 1)).flatten() for s in (0.05, 0.2, 0.6)]
        y = (x + 0.2 * noise).clamp(-1, 1)
        d_sym = model(y, x).flatten()
    torch.testing.assert_close(d0, torch.zeros(2), rtol=0, atol=1e-6)
    assert (d[0] > 1e-4).all() and (d[0] < d[1]).all() and (d[1] < d[2]).all()
    torch.testing.assert_close(d_sym, d[1], rtol=1e-5, atol=1e-6)


def test_frozen_eval_and_differentiable(eff_lpips):
    assert not any(p.requires_grad for p in eff_lpips.parameters())
    eff_lpips.train()
    assert not eff_lpips.training and not any(m.training for m in eff_lpips.modules())
    bn = eff_lpips.net._bn0
    before = bn.running_mean.clone()
    x = cat_image(32)
    y = (x + 0.1 * torch.randn_like(x)).requires_grad_(True)
    eff_lpips(x, y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    torch.testing.assert_close(bn.running_mean, before, rtol=0, atol=0)


def test_build_perceptual_loss(vgg_file):
    assert isinstance(build_perceptual_loss(LossConfig()), EfficientNetLPIPS)
    cfg = LossConfig(perceptual_backbone="vgg16", vgg16_weights=str(vgg_file),
                     lpips_heads=str(LPIPS_HEADS))
    assert isinstance(build_perceptual_loss(cfg), LPIPS)
    with pytest.raises(ConfigError, match="efficientnet_lite0"):
        build_perceptual_loss(dataclasses.replace(cfg, perceptual_backbone="alex"))


def test_an_autoencoder_with_its_loss_loads_strictly_without_warnings(tmp_path):
    # A strict load builds the model empty (meta tensors) and assigns the file's weights: the
    # perceptual backbones must not read their pretrained files into meta tensors (torch
    # warned once per tensor) nor keep those instead of the checkpoint's.
    import warnings

    from ldm.config import AutoencoderConfig, from_dict
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.pretrained import load_pretrained, save_pretrained

    cfg = from_dict(AutoencoderConfig, {
        "ddconfig": {"ch": 32, "ch_mult": [1, 2]},
        "lossconfig": {"perceptual_backbone": "efficientnet_lite0"}})
    model = AutoencoderKL(cfg)
    with torch.no_grad():
        for p in model.loss.perceptual_loss.parameters():
            p.add_(1.0)  # not ImageNet's any more: the loaded copy must be the file's
    save_pretrained(tmp_path / "ae", model, "autoencoder", cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = load_pretrained(tmp_path / "ae")
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
