"""LPIPSWithDiscriminator against CompVis contperceptual.py: formulas recomputed here, the
adaptive weight via torch.autograd.grad, the discriminator warm-up, log and state-dict keys."""
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm.config import LossConfig
from ldm.modules.distributions import DiagonalGaussianDistribution
from ldm.modules.losses.lpips_disc import LPIPSWithDiscriminator

GEN_KEYS = {"total_loss", "logvar", "kl_loss", "nll_loss", "rec_loss", "d_weight", "disc_factor",
            "g_loss"}
DISC_KEYS = {"disc_loss", "logits_real", "logits_fake"}
LPIPS_HEADS = Path(importlib.util.find_spec("lpips").submodule_search_locations[0]) / (
    "weights/v0.1/vgg.pth")


@pytest.fixture(scope="module")
def loss_fn():
    cfg = LossConfig(disc_start=10, logvar_init=0.3, kl_weight=1e-3, disc_weight=0.5)
    return LPIPSWithDiscriminator(cfg)


class TinyAE(nn.Module):
    """Encoder conv -> Gaussian posterior -> decoder conv (its weight is the 'last layer')."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, padding=1)
        self.dec = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        posterior = DiagonalGaussianDistribution(self.enc(x))
        return torch.tanh(self.dec(posterior.sample())), posterior


def batch():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    ae = TinyAE()
    xrec, posterior = ae(x)
    return x, xrec, posterior, ae.dec.weight


def expected_nll(loss_fn, x, xrec):
    """CompVis: rec = |x - xrec| + w_p * LPIPS; nll = rec / exp(logvar) + logvar; sum / B."""
    rec = (x - xrec).abs() + loss_fn.perceptual_weight * loss_fn.perceptual_loss(x, xrec)
    nll = rec / torch.exp(loss_fn.logvar) + loss_fn.logvar
    return rec, nll


def test_generator_step_matches_formulas(loss_fn):
    loss_fn.train()
    x, xrec, posterior, last = batch()
    loss, log = loss_fn(x, xrec, posterior, 0, global_step=10, last_layer=last)

    rec, nll = expected_nll(loss_fn, x, xrec)
    nll_loss = nll.sum() / 2
    g_loss = -loss_fn.discriminator(xrec).mean()
    g_nll = torch.autograd.grad(nll_loss, last, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
    d_weight = (g_nll.norm() / (g_gan.norm() + 1e-4)).clamp(0, 1e4) * 0.5
    mean, logvar = posterior.mean, posterior.logvar
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()

    assert set(log) == {f"train/{k}" for k in GEN_KEYS}
    torch.testing.assert_close(log["train/d_weight"], d_weight)
    assert log["train/d_weight"].item() > 0
    torch.testing.assert_close(log["train/nll_loss"], nll_loss.detach())
    torch.testing.assert_close(log["train/rec_loss"], rec.mean().detach())
    torch.testing.assert_close(log["train/kl_loss"], kl.detach())
    torch.testing.assert_close(log["train/g_loss"], g_loss.detach())
    torch.testing.assert_close(log["train/logvar"], torch.tensor(0.3))
    assert log["train/disc_factor"].item() == 1.0
    expected = nll_loss + 1e-3 * kl + d_weight * 1.0 * g_loss
    torch.testing.assert_close(loss, expected)
    # The loss trains the autoencoder and logvar, not the frozen perceptual net.
    loss.backward()
    assert last.grad is not None and last.grad.abs().sum() > 0
    assert loss_fn.logvar.grad is not None
    assert all(p.grad is None for p in loss_fn.perceptual_loss.parameters())
    loss_fn.zero_grad()


def test_weights_scale_the_nll(loss_fn):
    x, xrec, posterior, last = batch()
    w = torch.rand(2, 1, 1, 1)
    loss, log = loss_fn(x, xrec, posterior, 0, global_step=0, last_layer=last, weights=w)
    _, nll = expected_nll(loss_fn, x, xrec)
    kl = posterior.kl().sum() / 2
    torch.testing.assert_close(loss, (w * nll).sum() / 2 + 1e-3 * kl)
    torch.testing.assert_close(log["train/nll_loss"], (nll.sum() / 2).detach())


def test_no_gan_before_disc_start(loss_fn):
    x, xrec, posterior, last = batch()
    loss, log = loss_fn(x, xrec, posterior, 0, global_step=9, last_layer=last)
    assert log["train/disc_factor"].item() == 0.0
    _, nll = expected_nll(loss_fn, x, xrec)
    torch.testing.assert_close(loss, nll.sum() / 2 + 1e-3 * posterior.kl().sum() / 2)
    d_loss, dlog = loss_fn(x, xrec, posterior, 1, global_step=9, last_layer=last)
    assert d_loss.item() == 0.0 and set(dlog) == {f"train/{k}" for k in DISC_KEYS}


@pytest.mark.parametrize("kind", ["hinge", "vanilla"])
def test_discriminator_step(kind):
    cfg = LossConfig(disc_start=0, disc_loss=kind, disc_factor=0.7, perceptual_weight=0.0)
    loss_fn = LPIPSWithDiscriminator(cfg)
    x, xrec, posterior, last = batch()
    d_loss, log = loss_fn(x, xrec, posterior, 1, global_step=5, last_layer=last, split="val")
    real, fake = loss_fn.discriminator(x), loss_fn.discriminator(xrec.detach())
    if kind == "hinge":
        ref = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
    else:
        ref = 0.5 * (torch.log1p(torch.exp(-real)).mean() + torch.log1p(torch.exp(fake)).mean())
    assert set(log) == {f"val/{k}" for k in DISC_KEYS}
    torch.testing.assert_close(d_loss, 0.7 * ref)
    torch.testing.assert_close(log["val/logits_real"], real.mean().detach())
    d_loss.backward()  # only the discriminator gets gradients
    assert last.grad is None
    assert loss_fn.discriminator.main[0].weight.grad is not None


def test_validation_without_graph_gives_zero_d_weight(loss_fn):
    x, xrec, posterior, last = batch()
    loss_fn.eval()
    try:
        with torch.no_grad():
            _, log = loss_fn(x, xrec.detach(), posterior, 0, global_step=100, last_layer=last,
                             split="val")
    finally:
        loss_fn.train()
    assert set(log) == {f"val/{k}" for k in GEN_KEYS}
    assert log["val/d_weight"].item() == 0.0
    # In training the same failure is an error, as in CompVis.
    with pytest.raises(RuntimeError), torch.no_grad():
        loss_fn(x, xrec.detach(), posterior, 0, global_step=100, last_layer=last)


def test_train_keeps_perceptual_frozen(loss_fn):
    loss_fn.train()
    assert loss_fn.training and loss_fn.discriminator.training
    assert not any(m.training for m in loss_fn.perceptual_loss.modules())


def compvis_keys_vgg16() -> list[str]:
    """CompVis LPIPSWithDiscriminator state dict (n_layers=3): logvar, taming LPIPS, PatchGAN."""
    keys = ["logvar", "perceptual_loss.scaling_layer.shift", "perceptual_loss.scaling_layer.scale"]
    slices = {1: (0, 2), 2: (5, 7), 3: (10, 12, 14), 4: (17, 19, 21), 5: (24, 26, 28)}
    for s, convs in slices.items():
        for i in convs:
            keys += [f"perceptual_loss.net.slice{s}.{i}.weight",
                     f"perceptual_loss.net.slice{s}.{i}.bias"]
    keys += [f"perceptual_loss.lin{k}.model.1.weight" for k in range(5)]
    keys += ["discriminator.main.0.weight", "discriminator.main.0.bias"]
    for conv, bn in ((2, 3), (5, 6), (8, 9)):
        keys.append(f"discriminator.main.{conv}.weight")
        keys += [f"discriminator.main.{bn}.{b}" for b in
                 ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    keys += ["discriminator.main.11.weight", "discriminator.main.11.bias"]
    return keys


def test_state_dict_keys_and_compvis_checkpoint_load():
    cfg = LossConfig(perceptual_backbone="vgg16", lpips_heads=str(LPIPS_HEADS))
    loss_fn = LPIPSWithDiscriminator(cfg)
    sd = loss_fn.state_dict()
    assert list(sd) == compvis_keys_vgg16()
    assert sd["logvar"].shape == ()
    # A CompVis-style checkpoint (same keys, other values) loads strictly and lands in place.
    ckpt = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in sd.items()}
    loss_fn.load_state_dict(ckpt, strict=True)
    torch.testing.assert_close(getattr(loss_fn.perceptual_loss.net.slice3, "12").weight,
                               ckpt["perceptual_loss.net.slice3.12.weight"])
    torch.testing.assert_close(loss_fn.logvar, ckpt["logvar"])


def test_efficientnet_state_dict_prefixes(loss_fn):
    keys = list(loss_fn.state_dict())
    assert keys[0] == "logvar"
    assert {k.split(".")[0] for k in keys} == {"logvar", "perceptual_loss", "discriminator"}
    assert "perceptual_loss.net._blocks.15._project_conv.weight" in keys
