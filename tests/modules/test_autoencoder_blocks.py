"""Encoder/Decoder blocks: CompVis state-dict keys, shapes and hand-computed numerics."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldm.config import DDConfig
from ldm.modules.autoencoder_blocks import (
    AttnBlock,
    Decoder,
    Downsample,
    Encoder,
    ResnetBlock,
    Upsample,
)

TINY = DDConfig(
    ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=32, z_channels=4
)
THREE_LEVELS = DDConfig(
    ch=32,
    ch_mult=(1, 1, 2),
    num_res_blocks=2,
    attn_resolutions=(8, 32),
    resolution=32,
    z_channels=3,
    double_z=True,
)


# --- an independent generator of CompVis's key names, following model.py's loops ---------------


def _norm(p, c):
    return [(f"{p}.weight", (c,)), (f"{p}.bias", (c,))]


def _conv(p, cout, cin, k):
    return [(f"{p}.weight", (cout, cin, k, k)), (f"{p}.bias", (cout,))]


def _resnet(p, cin, cout):
    keys = _norm(f"{p}.norm1", cin) + _conv(f"{p}.conv1", cout, cin, 3)
    keys += _norm(f"{p}.norm2", cout) + _conv(f"{p}.conv2", cout, cout, 3)
    if cin != cout:
        keys += _conv(f"{p}.nin_shortcut", cout, cin, 1)
    return keys


def _attn(p, c):
    keys = _norm(f"{p}.norm", c)
    for name in ("q", "k", "v", "proj_out"):
        keys += _conv(f"{p}.{name}", c, c, 1)
    return keys


def _mid(p, c):
    return _resnet(f"{p}.block_1", c, c) + _attn(f"{p}.attn_1", c) + _resnet(f"{p}.block_2", c, c)


def compvis_encoder_keys(cfg, p="encoder"):
    keys = _conv(f"{p}.conv_in", cfg.ch, cfg.in_channels, 3)
    res, cin = cfg.resolution, cfg.ch
    for i, mult in enumerate(cfg.ch_mult):
        cout = cfg.ch * mult
        blocks, attns = [], []
        for j in range(cfg.num_res_blocks):
            blocks += _resnet(f"{p}.down.{i}.block.{j}", cin, cout)
            cin = cout
            if res in cfg.attn_resolutions:
                attns += _attn(f"{p}.down.{i}.attn.{j}", cout)
        keys += blocks + attns
        if i != len(cfg.ch_mult) - 1:
            keys += _conv(f"{p}.down.{i}.downsample.conv", cin, cin, 3)
            res //= 2
    keys += _mid(f"{p}.mid", cin) + _norm(f"{p}.norm_out", cin)
    zc = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
    return keys + _conv(f"{p}.conv_out", zc, cin, 3)


def compvis_decoder_keys(cfg, p="decoder"):
    n = len(cfg.ch_mult)
    cin = cfg.ch * cfg.ch_mult[-1]
    res = cfg.resolution // 2 ** (n - 1)
    keys = _conv(f"{p}.conv_in", cin, cfg.z_channels, 3) + _mid(f"{p}.mid", cin)
    per_level = {}
    for i in reversed(range(n)):  # built bottom-up, stored as up[i]
        cout = cfg.ch * cfg.ch_mult[i]
        blocks, attns = [], []
        for j in range(cfg.num_res_blocks + 1):
            blocks += _resnet(f"{p}.up.{i}.block.{j}", cin, cout)
            cin = cout
            if res in cfg.attn_resolutions:
                attns += _attn(f"{p}.up.{i}.attn.{j}", cout)
        per_level[i] = blocks + attns
        if i != 0:
            per_level[i] += _conv(f"{p}.up.{i}.upsample.conv", cin, cin, 3)
            res *= 2
    for i in range(n):
        keys += per_level[i]
    return keys + _norm(f"{p}.norm_out", cin) + _conv(f"{p}.conv_out", cfg.out_ch, cin, 3)


def _keys_and_shapes(module, prefix):
    return [(f"{prefix}.{k}", tuple(v.shape)) for k, v in module.state_dict().items()]


@pytest.mark.parametrize("cfg", [TINY, THREE_LEVELS])
def test_encoder_state_dict_matches_compvis(cfg):
    assert _keys_and_shapes(Encoder(cfg), "encoder") == compvis_encoder_keys(cfg)


@pytest.mark.parametrize("cfg", [TINY, THREE_LEVELS])
def test_decoder_state_dict_matches_compvis(cfg):
    assert _keys_and_shapes(Decoder(cfg), "decoder") == compvis_decoder_keys(cfg)


def test_tiny_keys_spot_checks_written_by_hand():
    enc = dict(_keys_and_shapes(Encoder(TINY), "encoder"))
    dec = dict(_keys_and_shapes(Decoder(TINY), "decoder"))
    # conv 2, norm 2, ResnetBlock 8 (+2 with nin_shortcut), AttnBlock 10, mid 8 + 10 + 8.
    # Encoder: conv_in 2, down.0 (block 8, downsample 2), down.1 (block 10, attn 10), mid 26,
    # norm_out 2, conv_out 2. Decoder: conv_in 2, mid 26, up.0 (blocks 10 + 8),
    # up.1 (blocks 8 + 8, attns 10 + 10, upsample 2), norm_out 2, conv_out 2.
    assert len(enc) == 62 and len(dec) == 88
    assert enc["encoder.conv_in.weight"] == (32, 3, 3, 3)
    assert enc["encoder.down.0.downsample.conv.weight"] == (32, 32, 3, 3)
    assert enc["encoder.down.1.block.0.nin_shortcut.weight"] == (64, 32, 1, 1)
    assert enc["encoder.down.1.attn.0.proj_out.weight"] == (64, 64, 1, 1)
    assert enc["encoder.mid.attn_1.q.bias"] == (64,)
    assert enc["encoder.conv_out.weight"] == (8, 64, 3, 3)
    assert not any(k.startswith(("encoder.down.0.attn", "encoder.down.1.downsample")) for k in enc)
    assert dec["decoder.conv_in.weight"] == (64, 4, 3, 3)
    assert dec["decoder.up.1.attn.1.v.weight"] == (64, 64, 1, 1)  # level 1 at 16 px
    assert dec["decoder.up.1.upsample.conv.weight"] == (64, 64, 3, 3)
    assert dec["decoder.up.0.block.0.nin_shortcut.weight"] == (32, 64, 1, 1)
    assert dec["decoder.up.0.block.1.conv2.weight"] == (32, 32, 3, 3)
    assert dec["decoder.conv_out.weight"] == (3, 32, 3, 3)
    assert not any(k.startswith(("decoder.up.0.attn", "decoder.up.0.upsample")) for k in dec)


def test_group_norms_are_32_groups_eps_1e_6():
    norms = [m for m in Encoder(TINY).modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 32 and m.eps == 1e-6 and m.affine for m in norms)


@pytest.mark.parametrize("cfg", [TINY, THREE_LEVELS])
def test_shapes_and_downsampling_factor(cfg):
    f = 2 ** (len(cfg.ch_mult) - 1)
    x = torch.randn(2, 3, 32, 24)
    h = Encoder(cfg)(x)
    assert h.shape == (2, 2 * cfg.z_channels, 32 // f, 24 // f)
    z = torch.randn(2, cfg.z_channels, 32 // f, 24 // f)
    assert Decoder(cfg)(z).shape == (2, 3, 32, 24)


def _rand_params_(module, scale=0.3):
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_attn_block_matches_einsum_softmax_attention():
    c = 32
    block = AttnBlock(c).double()
    _rand_params_(block)
    x = torch.randn(2, c, 5, 3, dtype=torch.float64)

    # Reference: group norm by hand, then a single head of width C over the 15 pixels.
    xg = x.reshape(2, 32, -1)
    xn = (
        (xg - xg.mean(-1, keepdim=True))
        / torch.sqrt(xg.var(-1, unbiased=False, keepdim=True) + 1e-6)
    ).reshape_as(x)
    xn = xn * block.norm.weight[:, None, None] + block.norm.bias[:, None, None]

    def proj(conv, t):
        return torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], t) + conv.bias[:, None, None]

    q, k, v = (proj(m, xn).flatten(2) for m in (block.q, block.k, block.v))  # b c n
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / np.sqrt(c), dim=-1)
    out = torch.einsum("bij,bcj->bci", w, v).reshape_as(x)
    ref = x + proj(block.proj_out, out)
    torch.testing.assert_close(block(x), ref)


def test_downsample_pads_only_right_and_bottom():
    down = Downsample(1).double()
    x = torch.arange(1.0, 17.0, dtype=torch.float64).reshape(1, 1, 4, 4)
    with torch.no_grad():
        down.conv.bias.zero_()
        # Tap at kernel (0, 0): output (i, j) reads input (2i, 2j), never padding.
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 0, 0] = 1.0
        assert down(x)[0, 0].tolist() == [[1.0, 3.0], [9.0, 11.0]]
        # Tap at kernel (2, 2): reads input (2i + 2, 2j + 2); row/column 4 is the zero pad.
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 2, 2] = 1.0
        assert down(x)[0, 0].tolist() == [[11.0, 0.0], [0.0, 0.0]]


def test_downsample_matches_loop_convolution():
    down = Downsample(2).double()
    _rand_params_(down)
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    w, b = down.conv.weight.detach().numpy(), down.conv.bias.detach().numpy()
    xp = np.zeros((2, 7, 7))
    xp[:, :6, :6] = x[0].numpy()  # one zero row at the bottom, one column at the right
    ref = np.zeros((2, 3, 3))
    for o in range(2):
        for i in range(3):
            for j in range(3):
                ref[o, i, j] = b[o] + np.sum(w[o] * xp[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3])
    np.testing.assert_allclose(down(x)[0].detach().numpy(), ref, rtol=1e-12, atol=1e-12)


def test_upsample_is_nearest_then_conv():
    up = Upsample(1)
    with torch.no_grad():
        up.conv.weight.zero_()
        up.conv.weight[0, 0, 1, 1] = 1.0  # identity kernel
        up.conv.bias.fill_(0.5)
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    expected = (
        torch.tensor([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]], dtype=torch.float32)
        + 0.5
    )
    assert torch.equal(up(x)[0, 0], expected)


def test_resnet_block_matches_functional_reference():
    block = ResnetBlock(32, 64).double().eval()
    _rand_params_(block)
    x = torch.randn(2, 32, 4, 4, dtype=torch.float64)

    def swish(t):
        return t * torch.sigmoid(t)

    def gn(t, norm):
        return F.group_norm(t, 32, norm.weight, norm.bias, eps=1e-6)

    h = F.conv2d(swish(gn(x, block.norm1)), block.conv1.weight, block.conv1.bias, padding=1)
    h = F.conv2d(swish(gn(h, block.norm2)), block.conv2.weight, block.conv2.bias, padding=1)
    skip = F.conv2d(x, block.nin_shortcut.weight, block.nin_shortcut.bias)
    torch.testing.assert_close(block(x), skip + h)


def test_resnet_block_identity_skip_when_channels_match():
    block = ResnetBlock(32)
    assert not hasattr(block, "nin_shortcut")
    with torch.no_grad():
        block.conv2.weight.zero_()
        block.conv2.bias.zero_()
    x = torch.randn(1, 32, 3, 3)
    assert torch.equal(block(x), x)
