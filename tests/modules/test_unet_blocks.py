"""Tests for ldm.modules.unet_blocks: timestep embedding and blocks against functional
references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from ldm.modules.attention import ATTENTION_BACKENDS, attention_backend
from ldm.modules.unet_blocks import AttentionBlock, GroupNorm32, ResBlock, timestep_embedding
from tests.modules.unet_helpers import perturb_

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
    perturb_(block, seed=1)
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
    perturb_(block, seed=2, std=0.3)
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
