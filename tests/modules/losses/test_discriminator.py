"""PatchGAN discriminator keys (taming's), init, and GAN losses against closed forms."""
import math

import pytest
import torch

from ldm.modules.losses.discriminator import (
    NLayerDiscriminator,
    adopt_weight,
    hinge_d_loss,
    vanilla_d_loss,
    weights_init,
)

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def taming_keys_n3(ndf: int = 64, input_nc: int = 3) -> dict[str, tuple[int, ...]]:
    """taming NLayerDiscriminator(input_nc, ndf, n_layers=3) state dict, written out by hand:
    main = [conv, lrelu, (conv, BN, lrelu) x 3, conv]."""
    keys = {"main.0.weight": (ndf, input_nc, 4, 4), "main.0.bias": (ndf,)}
    for conv, bn, c_in, c_out in ((2, 3, ndf, 2 * ndf), (5, 6, 2 * ndf, 4 * ndf),
                                  (8, 9, 4 * ndf, 8 * ndf)):
        keys[f"main.{conv}.weight"] = (c_out, c_in, 4, 4)  # no bias before BatchNorm
        for b in BN:
            keys[f"main.{bn}.{b}"] = () if b == "num_batches_tracked" else (c_out,)
    keys["main.11.weight"] = (1, 8 * ndf, 4, 4)
    keys["main.11.bias"] = (1,)
    return keys


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_keys_match_taming():
    d = NLayerDiscriminator(input_nc=3, ndf=64, n_layers=3)
    assert list(shapes(d)) == list(taming_keys_n3())
    assert shapes(d) == taming_keys_n3()
    assert shapes(NLayerDiscriminator(input_nc=7, ndf=8)) == taming_keys_n3(ndf=8, input_nc=7)


def test_actnorm_keys():
    d = NLayerDiscriminator(input_nc=3, ndf=8, n_layers=2, use_actnorm=True)
    # With ActNorm taming keeps the conv biases; ActNorm has loc, scale and `initialized`.
    assert shapes(d) == {
        "main.0.weight": (8, 3, 4, 4), "main.0.bias": (8,),
        "main.2.weight": (16, 8, 4, 4), "main.2.bias": (16,),
        "main.3.loc": (1, 16, 1, 1), "main.3.scale": (1, 16, 1, 1), "main.3.initialized": (),
        "main.5.weight": (32, 16, 4, 4), "main.5.bias": (32,),
        "main.6.loc": (1, 32, 1, 1), "main.6.scale": (1, 32, 1, 1), "main.6.initialized": (),
        "main.8.weight": (1, 32, 4, 4), "main.8.bias": (1,),
    }
    d.train()(torch.randn(4, 3, 32, 32))
    # After the first training batch, the first ActNorm output has zero mean / unit std.
    h = d.main[:4](torch.randn(4, 3, 32, 32))
    assert d.main[3].initialized.item() == 1
    assert h.mean().abs() < 0.3


def test_output_shape():
    d = NLayerDiscriminator(ndf=8)
    # 64 -> 32 -> 16 -> 8 (stride 2), then two stride-1 4x4 convs with padding 1: 8 -> 7 -> 6.
    assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)


def test_weights_init():
    d = NLayerDiscriminator().apply(weights_init)
    w = d.main[8].weight  # 512 * 256 * 16 values
    assert abs(w.mean().item()) < 1e-3 and abs(w.std().item() - 0.02) < 1e-3
    bn = d.main[9]
    assert abs(bn.weight.mean().item() - 1.0) < 0.01 and abs(bn.weight.std().item() - 0.02) < 0.005
    assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
    # Conv biases keep PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    b = d.main[0].bias
    assert b.abs().max() <= 1 / math.sqrt(3 * 16) and b.std() > 0.02


def test_hinge_d_loss_closed_form():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.5])
    # relu(1 - real) = [0, 0.5, 2], relu(1 + fake) = [0, 1, 2.5]
    expected = 0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 2.5) / 3)
    assert hinge_d_loss(real, fake).item() == pytest.approx(expected)


def test_vanilla_d_loss_closed_form():
    real = [2.0, 0.5, -1.0]
    fake = [-2.0, 0.0, 1.5]

    def softplus(v):
        return math.log(1 + math.exp(v))

    expected = 0.5 * (sum(softplus(-r) for r in real) / 3 + sum(softplus(f) for f in fake) / 3)
    got = vanilla_d_loss(torch.tensor(real), torch.tensor(fake)).item()
    assert got == pytest.approx(expected, rel=1e-6)


def test_adopt_weight():
    assert adopt_weight(1.0, global_step=9, threshold=10) == 0.0
    assert adopt_weight(1.0, global_step=10, threshold=10) == 1.0
    assert adopt_weight(0.5, global_step=3, threshold=10, value=0.25) == 0.25
