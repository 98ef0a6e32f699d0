"""AutoencoderKL: CompVis state-dict keys, shapes, encode/decode plumbing and posterior KL."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ldm.config import AutoencoderConfig, DDConfig
from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.distributions import DiagonalGaussianDistribution

DD = DDConfig(
    ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=32, z_channels=4
)
# embed_dim != z_channels so the two 1x1 convs have distinguishable shapes.
CFG = AutoencoderConfig(ddconfig=DD, embed_dim=3, lossconfig=None)


def _resnet(p, cin, cout):
    keys = [
        f"{p}.norm1.weight",
        f"{p}.norm1.bias",
        f"{p}.conv1.weight",
        f"{p}.conv1.bias",
        f"{p}.norm2.weight",
        f"{p}.norm2.bias",
        f"{p}.conv2.weight",
        f"{p}.conv2.bias",
    ]
    if cin != cout:
        keys += [f"{p}.nin_shortcut.weight", f"{p}.nin_shortcut.bias"]
    return keys


def _attn(p):
    return [f"{p}.{n}.{t}" for n in ("norm", "q", "k", "v", "proj_out") for t in ("weight", "bias")]


def _mid(p):
    return _resnet(f"{p}.block_1", 1, 1) + _attn(f"{p}.attn_1") + _resnet(f"{p}.block_2", 1, 1)


# CompVis AutoencoderKL for DD, written out level by level: module registration order is
# encoder, decoder, loss (absent here), quant_conv, post_quant_conv.
EXPECTED_KEYS = (
    ["encoder.conv_in.weight", "encoder.conv_in.bias"]
    + _resnet("encoder.down.0.block.0", 32, 32)
    + ["encoder.down.0.downsample.conv.weight", "encoder.down.0.downsample.conv.bias"]
    + _resnet("encoder.down.1.block.0", 32, 64)
    + _attn("encoder.down.1.attn.0")
    + _mid("encoder.mid")
    + ["encoder.norm_out.weight", "encoder.norm_out.bias"]
    + ["encoder.conv_out.weight", "encoder.conv_out.bias"]
    + ["decoder.conv_in.weight", "decoder.conv_in.bias"]
    + _mid("decoder.mid")
    + _resnet("decoder.up.0.block.0", 64, 32)
    + _resnet("decoder.up.0.block.1", 32, 32)
    + _resnet("decoder.up.1.block.0", 64, 64)
    + _resnet("decoder.up.1.block.1", 64, 64)
    + _attn("decoder.up.1.attn.0")
    + _attn("decoder.up.1.attn.1")
    + ["decoder.up.1.upsample.conv.weight", "decoder.up.1.upsample.conv.bias"]
    + ["decoder.norm_out.weight", "decoder.norm_out.bias"]
    + ["decoder.conv_out.weight", "decoder.conv_out.bias"]
    + ["quant_conv.weight", "quant_conv.bias", "post_quant_conv.weight", "post_quant_conv.bias"]
)

EXPECTED_SHAPES = {
    "encoder.conv_out.weight": (8, 64, 3, 3),  # 2 * z_channels moments
    "decoder.conv_in.weight": (64, 4, 3, 3),
    "decoder.conv_out.weight": (3, 32, 3, 3),
    "quant_conv.weight": (6, 8, 1, 1),  # 2 z_channels -> 2 embed_dim
    "quant_conv.bias": (6,),
    "post_quant_conv.weight": (4, 3, 1, 1),  # embed_dim -> z_channels
    "post_quant_conv.bias": (4,),
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return AutoencoderKL(CFG).eval()


def test_state_dict_keys_match_compvis(model):
    sd = model.state_dict()
    assert list(sd) == EXPECTED_KEYS
    for key, shape in EXPECTED_SHAPES.items():
        assert tuple(sd[key].shape) == shape, key


def test_no_loss_module_without_lossconfig(model):
    assert not hasattr(model, "loss")
    assert not any(name.startswith("loss") for name, _ in model.named_modules() if name)


def test_double_z_is_required():
    cfg = AutoencoderConfig(ddconfig=dataclasses.replace(DD, double_z=False), embed_dim=3)
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKL(cfg)


def test_shapes_and_downsampling_factor(model):
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    posterior = model.encode(x)
    assert isinstance(posterior, DiagonalGaussianDistribution)
    assert posterior.mean.shape == (2, 3, 16, 24)  # f = 2 ** (len(ch_mult) - 1) = 2
    assert model.downsample_factor == 2 and model.latent_shape(32, 48) == (3, 16, 24)
    assert model.decode(posterior.mode()).shape == (2, 3, 32, 48)


def test_encode_decode_compose_the_1x1_convs(model):
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        h = model.encoder(x)
        moments = F.conv2d(h, model.quant_conv.weight, model.quant_conv.bias)
        posterior = model.encode(x)
        torch.testing.assert_close(posterior.mean, moments[:, :3])
        torch.testing.assert_close(posterior.logvar, moments[:, 3:].clamp(-30, 20))
        z = torch.randn(1, 3, 16, 16)
        expected = model.decoder(
            F.conv2d(z, model.post_quant_conv.weight, model.post_quant_conv.bias)
        )
        torch.testing.assert_close(model.decode(z), expected)


def test_posterior_kl_closed_form(model):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        moments = model.quant_conv(model.encoder(x)).double()
    mu, logvar = moments[:, :3], moments[:, 3:]
    # KL(N(mu, sigma^2) || N(0, 1)) = 0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2)
    expected = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    with torch.no_grad():
        kl = model.encode(x).kl()
    assert kl.shape == (2,)
    torch.testing.assert_close(kl.double(), expected, rtol=1e-5, atol=1e-5)


def test_forward_samples_or_takes_the_mode(model):
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        post = model.encode(x)
        dec, _ = model(x, sample_posterior=False)
        torch.testing.assert_close(dec, model.decode(post.mean))

        torch.manual_seed(5)
        dec_s, post_s = model(x)
        torch.manual_seed(5)
        z = post.mean + post.std * torch.randn(post.mean.shape)
        torch.testing.assert_close(dec_s, model.decode(z))
        torch.testing.assert_close(post_s.mean, post.mean)
        assert not torch.allclose(dec_s, dec)


def test_last_layer_is_decoder_conv_out_weight(model):
    assert model.get_last_layer() is model.decoder.conv_out.weight


def test_loads_a_compvis_style_state_dict_strictly(model):
    g = torch.Generator().manual_seed(1)
    sd = {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
    fresh = AutoencoderKL(CFG)
    fresh.load_state_dict(sd, strict=True)
    assert torch.equal(fresh.quant_conv.weight, sd["quant_conv.weight"])
