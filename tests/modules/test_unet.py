"""Tests for ldm.modules.unet: CompVis state-dict layout, closed forms and block references."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from ldm.config import ConfigError, UNetConfig
from ldm.modules.attention import ATTENTION_BACKENDS, SpatialTransformer, attention_backend
from ldm.modules.unet import (
    AttentionBlock,
    GroupNorm32,
    QKVAttention,
    QKVAttentionLegacy,
    ResBlock,
    UNetModel,
    attention_heads,
    timestep_embedding,
)

# Tiny configs: two levels (32, 64 channels), attention at the 2x-downsampled level.
BASE = dict(
    image_size=8,
    in_channels=4,
    out_channels=4,
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(2,),
)
CFG_ST = UNetConfig(**BASE, num_heads=2, use_spatial_transformer=True, context_dim=16)
CFG_ST_HEAD_CHANNELS = UNetConfig(
    **BASE, num_head_channels=16, use_spatial_transformer=True, context_dim=16, legacy=False
)
CFG_ATTN = UNetConfig(**BASE, num_heads=2)
CFG_UPDOWN = UNetConfig(
    **{**BASE, "in_channels": 3, "out_channels": 5, "attention_resolutions": ()},
    num_heads=1,
    resblock_updown=True,
    use_scale_shift_norm=True,
    num_classes=3,
    n_embed=7,
)


def _perturb(module: torch.nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Give every parameter random values (also the zero-initialised ones)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


# --- expected CompVis keys, written per block in CompVis registration order --------------

def _res(prefix: str, cin: int, cout: int, emb: int = 128, scale_shift: bool = False) -> list:
    keys = [
        (f"{prefix}in_layers.0.weight", (cin,)),
        (f"{prefix}in_layers.0.bias", (cin,)),
        (f"{prefix}in_layers.2.weight", (cout, cin, 3, 3)),
        (f"{prefix}in_layers.2.bias", (cout,)),
        (f"{prefix}emb_layers.1.weight", (2 * cout if scale_shift else cout, emb)),
        (f"{prefix}emb_layers.1.bias", (2 * cout if scale_shift else cout,)),
        (f"{prefix}out_layers.0.weight", (cout,)),
        (f"{prefix}out_layers.0.bias", (cout,)),
        (f"{prefix}out_layers.3.weight", (cout, cout, 3, 3)),
        (f"{prefix}out_layers.3.bias", (cout,)),
    ]
    if cin != cout:
        keys += [
            (f"{prefix}skip_connection.weight", (cout, cin, 1, 1)),
            (f"{prefix}skip_connection.bias", (cout,)),
        ]
    return keys


def _st(prefix: str, c: int, ctx: int = 16) -> list:
    """SpatialTransformer with n_heads * d_head == c (true for every config here), depth 1."""
    b = f"{prefix}transformer_blocks.0."
    return [
        (f"{prefix}norm.weight", (c,)),
        (f"{prefix}norm.bias", (c,)),
        (f"{prefix}proj_in.weight", (c, c, 1, 1)),
        (f"{prefix}proj_in.bias", (c,)),
        (f"{b}attn1.to_q.weight", (c, c)),
        (f"{b}attn1.to_k.weight", (c, c)),
        (f"{b}attn1.to_v.weight", (c, c)),
        (f"{b}attn1.to_out.0.weight", (c, c)),
        (f"{b}attn1.to_out.0.bias", (c,)),
        (f"{b}ff.net.0.proj.weight", (8 * c, c)),
        (f"{b}ff.net.0.proj.bias", (8 * c,)),
        (f"{b}ff.net.2.weight", (c, 4 * c)),
        (f"{b}ff.net.2.bias", (c,)),
        (f"{b}attn2.to_q.weight", (c, c)),
        (f"{b}attn2.to_k.weight", (c, ctx)),
        (f"{b}attn2.to_v.weight", (c, ctx)),
        (f"{b}attn2.to_out.0.weight", (c, c)),
        (f"{b}attn2.to_out.0.bias", (c,)),
        (f"{b}norm1.weight", (c,)),
        (f"{b}norm1.bias", (c,)),
        (f"{b}norm2.weight", (c,)),
        (f"{b}norm2.bias", (c,)),
        (f"{b}norm3.weight", (c,)),
        (f"{b}norm3.bias", (c,)),
        (f"{prefix}proj_out.weight", (c, c, 1, 1)),
        (f"{prefix}proj_out.bias", (c,)),
    ]


def _attn(prefix: str, c: int) -> list:
    return [
        (f"{prefix}norm.weight", (c,)),
        (f"{prefix}norm.bias", (c,)),
        (f"{prefix}qkv.weight", (3 * c, c, 1)),
        (f"{prefix}qkv.bias", (3 * c,)),
        (f"{prefix}proj_out.weight", (c, c, 1)),
        (f"{prefix}proj_out.bias", (c,)),
    ]


def _conv(prefix: str, cout: int, cin: int, k: int = 3) -> list:
    return [(f"{prefix}weight", (cout, cin, k, k)), (f"{prefix}bias", (cout,))]


def _expected_keys(attn) -> list:
    """Layout CompVis builds for BASE (ds=1: 32 ch, ds=2: 64 ch); `attn` makes the attention keys.

    Skip channels pushed by the encoder: [32 (conv_in), 32 (res), 32 (down), 64 (res+attn)];
    the decoder pops them in reverse: 64+64, 64+32 (then upsample), 64+32, 32+32.
    """
    return [
        ("time_embed.0.weight", (128, 32)),
        ("time_embed.0.bias", (128,)),
        ("time_embed.2.weight", (128, 128)),
        ("time_embed.2.bias", (128,)),
        *_conv("input_blocks.0.0.", 32, 4),
        *_res("input_blocks.1.0.", 32, 32),
        *_conv("input_blocks.2.0.op.", 32, 32),
        *_res("input_blocks.3.0.", 32, 64),
        *attn("input_blocks.3.1.", 64),
        *_res("middle_block.0.", 64, 64),
        *attn("middle_block.1.", 64),
        *_res("middle_block.2.", 64, 64),
        *_res("output_blocks.0.0.", 128, 64),
        *attn("output_blocks.0.1.", 64),
        *_res("output_blocks.1.0.", 96, 64),
        *attn("output_blocks.1.1.", 64),
        *_conv("output_blocks.1.2.conv.", 64, 64),
        *_res("output_blocks.2.0.", 96, 32),
        *_res("output_blocks.3.0.", 64, 32),
        ("out.0.weight", (32,)),
        ("out.0.bias", (32,)),
        *_conv("out.2.", 4, 32),
    ]


def _shapes(model: torch.nn.Module) -> list:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


@pytest.mark.parametrize("cfg", [CFG_ST, CFG_ST_HEAD_CHANNELS], ids=["num_heads", "head_channels"])
def test_state_dict_keys_spatial_transformer(cfg):
    assert _shapes(UNetModel(cfg)) == _expected_keys(_st)


def test_state_dict_keys_attention_block():
    assert _shapes(UNetModel(CFG_ATTN)) == _expected_keys(_attn)


def test_state_dict_keys_resblock_updown_scale_shift_classes_codebook():
    ss = dict(scale_shift=True)
    expected = [
        ("time_embed.0.weight", (128, 32)),
        ("time_embed.0.bias", (128,)),
        ("time_embed.2.weight", (128, 128)),
        ("time_embed.2.bias", (128,)),
        ("label_emb.weight", (3, 128)),
        *_conv("input_blocks.0.0.", 32, 3),
        *_res("input_blocks.1.0.", 32, 32, **ss),
        *_res("input_blocks.2.0.", 32, 32, **ss),  # down ResBlock: avg-pool resize, no params
        *_res("input_blocks.3.0.", 32, 64, **ss),
        *_res("middle_block.0.", 64, 64, **ss),
        *_attn("middle_block.1.", 64),  # the middle block always has attention
        *_res("middle_block.2.", 64, 64, **ss),
        *_res("output_blocks.0.0.", 128, 64, **ss),
        *_res("output_blocks.1.0.", 96, 64, **ss),
        *_res("output_blocks.1.1.", 64, 64, **ss),  # up ResBlock
        *_res("output_blocks.2.0.", 96, 32, **ss),
        *_res("output_blocks.3.0.", 64, 32, **ss),
        ("out.0.weight", (32,)),
        ("out.0.bias", (32,)),
        *_conv("out.2.", 5, 32),
        ("id_predictor.0.weight", (32,)),
        ("id_predictor.0.bias", (32,)),
        *_conv("id_predictor.1.", 7, 32, k=1),
    ]
    model = UNetModel(CFG_UPDOWN)
    assert _shapes(model) == expected
    assert model.input_blocks[2][0].updown and model.output_blocks[1][1].updown


def test_attention_head_split():
    st = UNetModel(CFG_ST).middle_block[1]
    assert isinstance(st, SpatialTransformer)
    assert st.transformer_blocks[0].attn1.heads == 2
    assert st.transformer_blocks[0].attn1.scale == 32**-0.5
    st = UNetModel(CFG_ST_HEAD_CHANNELS).middle_block[1]
    assert st.transformer_blocks[0].attn2.heads == 4
    assert st.transformer_blocks[0].attn2.scale == 16**-0.5
    model = UNetModel(CFG_ATTN)
    blocks = [model.input_blocks[3][1], model.middle_block[1], model.output_blocks[1][1]]
    assert all(isinstance(b.attention, QKVAttentionLegacy) for b in blocks)
    assert [b.attention.n_heads for b in blocks] == [2, 2, 2]
    new = UNetModel(dataclasses.replace(CFG_ATTN, use_new_attention_order=True, num_heads=4))
    assert isinstance(new.middle_block[1].attention, QKVAttention)
    assert new.middle_block[1].attention.n_heads == 4


@pytest.mark.parametrize(
    "args, expected",
    [
        # (ch, num_heads, num_head_channels, legacy, spatial) -> (num_heads, dim_head)
        ((64, 8, -1, True, True), (8, 8)),
        ((64, 8, -1, True, False), (8, -1)),  # AttentionBlock then uses its num_heads
        ((64, -1, 16, True, True), (4, 16)),
        ((64, -1, 16, True, False), (4, 16)),
        ((64, 8, -1, False, False), (8, 8)),
        ((64, 8, 32, False, True), (2, 32)),  # head width wins over head count
    ],
)
def test_attention_heads_legacy_rules(args, expected):
    assert attention_heads(*args) == expected


def test_num_heads_upsample_only_affects_legacy_decoder_attention_blocks():
    model = UNetModel(dataclasses.replace(CFG_ATTN, num_heads_upsample=4))
    assert model.input_blocks[3][1].attention.n_heads == 2
    assert model.middle_block[1].attention.n_heads == 2
    assert model.output_blocks[0][1].attention.n_heads == 4


# --- timestep embedding --------------------------------------------------------------------

@pytest.mark.parametrize("dim", [8, 7])
def test_timestep_embedding_closed_form(dim):
    t = [0, 1, 17.5, 999]
    emb = timestep_embedding(torch.tensor(t), dim)
    half = dim // 2
    expected = np.zeros((len(t), dim))
    for b, tb in enumerate(t):
        for i in range(half):
            w = 10000 ** (-i / half)
            expected[b, i] = math.cos(tb * w)
            expected[b, half + i] = math.sin(tb * w)
    assert emb.dtype == torch.float32 and emb.shape == (4, dim)
    np.testing.assert_allclose(emb.numpy(), expected, atol=2e-4)


def test_timestep_embedding_int_and_float_agree_and_max_period():
    ints = timestep_embedding(torch.tensor([3, 250]), 6, max_period=100)
    floats = timestep_embedding(torch.tensor([3.0, 250.0]), 6, max_period=100)
    torch.testing.assert_close(ints, floats)
    assert ints[1, 1].item() == pytest.approx(math.cos(250 * 100 ** (-1 / 3)), abs=1e-4)


# --- blocks against functional references --------------------------------------------------

def _ref_resblock(p: dict, x, emb, scale_shift: bool, resize: str | None):
    def gn(t, name):
        return F.group_norm(t, 32, p[f"{name}.weight"], p[f"{name}.bias"], eps=1e-5)

    h = F.silu(gn(x, "in_layers.0"))
    if resize == "down":
        h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
    elif resize == "up":
        h = h.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        x = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    h = F.conv2d(h, p["in_layers.2.weight"], p["in_layers.2.bias"], padding=1)
    e = F.linear(F.silu(emb), p["emb_layers.1.weight"], p["emb_layers.1.bias"])[:, :, None, None]
    if scale_shift:
        scale, shift = e.chunk(2, dim=1)
        h = gn(h, "out_layers.0") * (1 + scale) + shift
    else:
        h = gn(h + e, "out_layers.0")
    h = F.conv2d(F.silu(h), p["out_layers.3.weight"], p["out_layers.3.bias"], padding=1)
    if "skip_connection.weight" in p:
        x = F.conv2d(x, p["skip_connection.weight"], p["skip_connection.bias"])
    return x + h


@pytest.mark.parametrize(
    "cin, cout, scale_shift, resize",
    [(32, 64, False, None), (32, 32, True, "down"), (64, 64, True, "up"), (64, 32, False, "up")],
)
def test_resblock_matches_reference(cin, cout, scale_shift, resize):
    torch.manual_seed(0)
    block = ResBlock(
        cin, 16, 0.0, out_channels=cout, use_scale_shift_norm=scale_shift,
        up=resize == "up", down=resize == "down",
    )
    _perturb(block, seed=1)
    x, emb = torch.randn(2, cin, 4, 6), torch.randn(2, 16)
    out = block(x, emb)
    expected = _ref_resblock(dict(block.named_parameters()), x, emb, scale_shift, resize)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def _ref_attention_block(p: dict, x, heads: int, new_order: bool):
    b, c, hh, ww = x.shape
    flat = x.reshape(b, c, -1)
    h = F.group_norm(flat, 32, p["norm.weight"], p["norm.bias"], eps=1e-5)
    qkv = torch.einsum("bct,oc->bot", h, p["qkv.weight"][:, :, 0]) + p["qkv.bias"][None, :, None]
    layout = "(three h c)" if new_order else "(h three c)"
    q, k, v = rearrange(qkv, f"b {layout} t -> three b h c t", three=3, h=heads)
    w = torch.einsum("bhct,bhcs->bhts", q, k) / math.sqrt(q.shape[2])
    a = torch.einsum("bhts,bhcs->bhct", w.softmax(dim=-1), v)
    a = rearrange(a, "b h c t -> b (h c) t")
    out = torch.einsum("bct,oc->bot", a, p["proj_out.weight"][:, :, 0])
    out = out + p["proj_out.bias"][:, None]
    return (flat + out).reshape(b, c, hh, ww)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("new_order", [False, True])
def test_attention_block_matches_reference(backend, new_order):
    torch.manual_seed(0)
    block = AttentionBlock(64, num_head_channels=16, use_new_attention_order=new_order)
    _perturb(block, seed=2, std=0.3)
    x = torch.randn(2, 64, 3, 5)
    with attention_backend(backend):
        out = block(x)
    expected = _ref_attention_block(dict(block.named_parameters()), x, 4, new_order)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    other = _ref_attention_block(dict(block.named_parameters()), x, 4, not new_order)
    assert (out - other).abs().max() > 1e-3  # the two qkv layouts really differ


def test_group_norm32_computes_in_float32():
    norm = GroupNorm32(32, 64)
    x = torch.randn(2, 64, 4, 4).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    expected = F.group_norm(x.float(), 32, eps=1e-5).to(torch.bfloat16)
    assert torch.equal(out, expected)


# --- whole model ---------------------------------------------------------------------------

def test_forward_shapes_and_zero_output_at_init():
    model = UNetModel(CFG_ST).eval()
    x = torch.randn(2, 4, 8, 8)
    out = model(x, torch.tensor([10, 500]), torch.randn(2, 3, 16))
    assert out.shape == (2, 4, 8, 8)
    assert torch.equal(out, torch.zeros_like(out))  # `out` conv is zero-initialised

    model = UNetModel(CFG_UPDOWN).eval()
    logits = model(torch.randn(2, 3, 8, 8), torch.tensor([1.5, 7.0]), y=torch.tensor([0, 2]))
    assert logits.shape == (2, 7, 8, 8)  # n_embed codebook logits


def test_output_depends_on_context_timestep_and_batch_independent():
    torch.manual_seed(0)
    model = UNetModel(CFG_ST).eval()
    _perturb(model, seed=5)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 3, 16)
    with torch.no_grad():
        out = model(x, t, ctx)
        assert (out - model(x, t, torch.randn(2, 3, 16))).abs().max() > 1e-3
        assert (out - model(x, torch.tensor([11, 501]), ctx)).abs().max() > 1e-4
        # Each sample is processed on its own (GroupNorm, not BatchNorm).
        torch.testing.assert_close(model(x[1:], t[1:], ctx[1:]), out[1:], atol=1e-5, rtol=1e-5)
        with attention_backend("math"):
            torch.testing.assert_close(model(x, t, ctx), out, atol=1e-5, rtol=1e-5)


def test_class_labels_required_iff_num_classes():
    model = UNetModel(CFG_UPDOWN)
    with pytest.raises(ValueError, match="class-conditional"):
        model(torch.randn(1, 3, 8, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="class-conditional"):
        UNetModel(CFG_ATTN)(torch.randn(1, 4, 8, 8), torch.tensor([1]), y=torch.tensor([0]))


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(use_spatial_transformer=True), "context_dim"),
        (dict(context_dim=16), "use_spatial_transformer"),
        (dict(num_heads=-1, num_head_channels=-1), "num_head"),
    ],
)
def test_invalid_configs_are_rejected(changes, match):
    with pytest.raises(ConfigError, match=match):
        UNetModel(dataclasses.replace(CFG_ATTN, **changes))


def test_onnx_export_matches_pytorch(tmp_path):
    import onnxruntime

    torch.manual_seed(0)
    model = UNetModel(CFG_ST).eval()
    _perturb(model, seed=6)
    args = (torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.randn(1, 3, 16))
    path = tmp_path / "unet.onnx"
    with attention_backend("math"), torch.no_grad():
        torch.onnx.export(
            model, args, str(path), dynamo=False, opset_version=17,
            input_names=["sample", "timestep", "encoder_hidden_states"], output_names=["eps"],
            dynamic_axes={
                "sample": {0: "batch", 2: "height", 3: "width"},
                "timestep": {0: "batch"},
                "encoder_hidden_states": {0: "batch", 1: "tokens"},
            },
        )
    # Run at another batch size, resolution and token count than the traced one.
    x, t, ctx = torch.randn(2, 4, 12, 16), torch.tensor([5, 900]), torch.randn(2, 5, 16)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(
        None, {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": ctx.numpy()}
    )
    with torch.no_grad():
        expected = model(x, t, ctx)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=1e-4)
