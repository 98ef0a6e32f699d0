"""Tests for ldm.modules.unet: CompVis state-dict layout and attention head rules."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from ldm.modules.attention import SpatialTransformer
from ldm.modules.unet import QKVAttention, QKVAttentionLegacy, UNetModel, attention_heads
from tests.modules.unet_helpers import CFG_ATTN, CFG_ST, CFG_ST_HEAD_CHANNELS, CFG_UPDOWN

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
