"""Tests for ldm.modules.attention against hand-written references and CompVis key names."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from ldm.modules.attention import (
    ATTENTION_BACKENDS,
    BasicTransformerBlock,
    CrossAttention,
    FeedForward,
    SpatialTransformer,
    attention,
    attention_backend,
    get_attention_backend,
    math_attention,
    sdpa_attention,
    set_attention_backend,
)


def _perturb(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Give every parameter random values (also the zero-initialised ones)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


# --- independent references -------------------------------------------------------------

def _ref_cross_attention(p: dict, prefix: str, x, context, heads: int):
    """CompVis CrossAttention written out with einsum, scaling after the matmul."""
    context = x if context is None else context
    q = x @ p[f"{prefix}to_q.weight"].T
    k = context @ p[f"{prefix}to_k.weight"].T
    v = context @ p[f"{prefix}to_v.weight"].T
    q, k, v = (rearrange(t, "b n (h d) -> (b h) n d", h=heads) for t in (q, k, v))
    sim = torch.einsum("bid,bjd->bij", q, k) * q.shape[-1] ** -0.5
    out = torch.einsum("bij,bjd->bid", sim.softmax(dim=-1), v)
    out = rearrange(out, "(b h) n d -> b n (h d)", h=heads)
    return out @ p[f"{prefix}to_out.0.weight"].T + p[f"{prefix}to_out.0.bias"]


def _ref_block(p: dict, prefix: str, x, context, heads: int):
    def ln(t, name):
        return F.layer_norm(t, t.shape[-1:], p[f"{prefix}{name}.weight"], p[f"{prefix}{name}.bias"])

    x = _ref_cross_attention(p, f"{prefix}attn1.", ln(x, "norm1"), None, heads) + x
    x = _ref_cross_attention(p, f"{prefix}attn2.", ln(x, "norm2"), context, heads) + x
    h = ln(x, "norm3") @ p[f"{prefix}ff.net.0.proj.weight"].T + p[f"{prefix}ff.net.0.proj.bias"]
    a, gate = h.chunk(2, dim=-1)
    h = (a * F.gelu(gate)) @ p[f"{prefix}ff.net.2.weight"].T + p[f"{prefix}ff.net.2.bias"]
    return h + x


def _ref_spatial_transformer(p: dict, x, context, heads: int, depth: int):
    b, c, hh, ww = x.shape
    h = F.group_norm(x, 32, p["norm.weight"], p["norm.bias"], eps=1e-6)
    h = torch.einsum("bchw,oc->bohw", h, p["proj_in.weight"][:, :, 0, 0])
    h = h + p["proj_in.bias"][None, :, None, None]
    h = rearrange(h, "b c h w -> b (h w) c")
    for i in range(depth):
        h = _ref_block(p, f"transformer_blocks.{i}.", h, context, heads)
    h = rearrange(h, "b (h w) c -> b c h w", h=hh, w=ww)
    h = torch.einsum("bchw,oc->bohw", h, p["proj_out.weight"][:, :, 0, 0])
    return h + p["proj_out.bias"][None, :, None, None] + x


# --- attention kernels -----------------------------------------------------------------

@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_attention_kernel_matches_closed_form(backend):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, n, 8, generator=gen) for n in (5, 7, 7))
    scale = 0.3
    with attention_backend(backend):
        out = attention(q, k, v, scale)
    weights = torch.exp(torch.einsum("bhid,bhjd->bhij", q, k) * scale)
    expected = torch.einsum("bhij,bhjd->bhid", weights / weights.sum(-1, keepdim=True), v)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_math_and_sdpa_agree_with_mask():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, n, 16, generator=gen) for n in (6, 9, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 5:] = False
    mask[1, :2] = False
    a = math_attention(q, k, v, 16**-0.5, mask)
    b = sdpa_attention(q, k, v, 16**-0.5, mask)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # Masked keys do not count: dropping them gives the same result.
    torch.testing.assert_close(
        a[:1], math_attention(q[:1], k[:1, :, :5], v[:1, :, :5], 16**-0.5), atol=1e-5, rtol=1e-5
    )


def test_backend_switch_is_restored_and_validated():
    assert get_attention_backend() == "sdpa"
    with attention_backend("math"):
        assert get_attention_backend() == "math"
    assert get_attention_backend() == "sdpa"
    with pytest.raises(ValueError, match="allowed"):
        set_attention_backend("flash")
    assert get_attention_backend() == "sdpa"


# --- CrossAttention ----------------------------------------------------------------------

def test_cross_attention_keys_and_shapes():
    attn = CrossAttention(24, context_dim=16, heads=3, dim_head=8)
    shapes = {k: tuple(v.shape) for k, v in attn.state_dict().items()}
    assert list(shapes.items()) == [
        ("to_q.weight", (24, 24)),
        ("to_k.weight", (24, 16)),
        ("to_v.weight", (24, 16)),
        ("to_out.0.weight", (24, 24)),
        ("to_out.0.bias", (24,)),
    ]
    assert attn.scale == 8**-0.5


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("use_context", [True, False])
def test_cross_attention_matches_einsum_reference(backend, use_context):
    torch.manual_seed(0)
    attn = CrossAttention(20, context_dim=12, heads=2, dim_head=6)
    if not use_context:
        attn = CrossAttention(20, heads=2, dim_head=6)
    x = torch.randn(3, 5, 20)
    context = torch.randn(3, 7, 12) if use_context else None
    with attention_backend(backend):
        out = attn(x, context)
    expected = _ref_cross_attention(dict(attn.named_parameters()), "", x, context, heads=2)
    assert out.shape == (3, 5, 20)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_cross_attention_mask_ignores_masked_tokens():
    torch.manual_seed(0)
    attn = CrossAttention(16, context_dim=8, heads=2, dim_head=4)
    x, context = torch.randn(1, 4, 16), torch.randn(1, 6, 8)
    mask = torch.tensor([[True, True, True, False, False, False]])
    changed = context.clone()
    changed[:, 3:] = torch.randn(1, 3, 8)
    for backend in ATTENTION_BACKENDS:
        with attention_backend(backend):
            torch.testing.assert_close(attn(x, context, mask), attn(x, changed, mask))
            torch.testing.assert_close(attn(x, context, mask), attn(x, context[:, :3]))


# --- FeedForward and BasicTransformerBlock -----------------------------------------------

def test_feedforward_keys_glu_and_plain():
    glu = {k: tuple(v.shape) for k, v in FeedForward(8, glu=True).state_dict().items()}
    assert glu == {
        "net.0.proj.weight": (64, 8),
        "net.0.proj.bias": (64,),
        "net.2.weight": (8, 32),
        "net.2.bias": (8,),
    }
    plain = {k: tuple(v.shape) for k, v in FeedForward(8, dim_out=5).state_dict().items()}
    assert plain == {
        "net.0.0.weight": (32, 8),
        "net.0.0.bias": (32,),
        "net.2.weight": (5, 32),
        "net.2.bias": (5,),
    }


def test_basic_transformer_block_checkpoint_matches_plain():
    torch.manual_seed(0)
    block = BasicTransformerBlock(16, 2, 8, context_dim=8, checkpoint=True).train()
    x = torch.randn(2, 5, 16, requires_grad=True)
    context = torch.randn(2, 3, 8)
    out = block(x, context)
    out.square().sum().backward()
    grad_ckpt = x.grad.clone()
    x.grad = None
    block.checkpoint = False
    out_plain = block(x, context)
    out_plain.square().sum().backward()
    torch.testing.assert_close(out, out_plain)
    torch.testing.assert_close(grad_ckpt, x.grad)


# --- SpatialTransformer -----------------------------------------------------------------

def _spatial_transformer_keys(c: int, inner: int, ctx: int, depth: int) -> list[tuple]:
    """Keys in CompVis registration order: norm, proj_in, blocks(attn1, ff, attn2, norm1-3), out."""
    keys = [("norm.weight", (c,)), ("norm.bias", (c,)),
            ("proj_in.weight", (inner, c, 1, 1)), ("proj_in.bias", (inner,))]
    for i in range(depth):
        p = f"transformer_blocks.{i}."
        keys += [
            (p + "attn1.to_q.weight", (inner, inner)),
            (p + "attn1.to_k.weight", (inner, inner)),
            (p + "attn1.to_v.weight", (inner, inner)),
            (p + "attn1.to_out.0.weight", (inner, inner)),
            (p + "attn1.to_out.0.bias", (inner,)),
            (p + "ff.net.0.proj.weight", (8 * inner, inner)),
            (p + "ff.net.0.proj.bias", (8 * inner,)),
            (p + "ff.net.2.weight", (inner, 4 * inner)),
            (p + "ff.net.2.bias", (inner,)),
            (p + "attn2.to_q.weight", (inner, inner)),
            (p + "attn2.to_k.weight", (inner, ctx)),
            (p + "attn2.to_v.weight", (inner, ctx)),
            (p + "attn2.to_out.0.weight", (inner, inner)),
            (p + "attn2.to_out.0.bias", (inner,)),
        ]
        for n in (1, 2, 3):
            keys += [(p + f"norm{n}.weight", (inner,)), (p + f"norm{n}.bias", (inner,))]
    keys += [("proj_out.weight", (c, inner, 1, 1)), ("proj_out.bias", (c,))]
    return keys


def test_spatial_transformer_keys_and_shapes():
    st = SpatialTransformer(64, n_heads=2, d_head=16, depth=2, context_dim=12)
    got = [(k, tuple(v.shape)) for k, v in st.state_dict().items()]
    assert got == _spatial_transformer_keys(64, 32, 12, depth=2)
    assert st.norm.eps == 1e-6 and st.norm.num_groups == 32


def test_spatial_transformer_is_identity_at_init():
    torch.manual_seed(0)
    st = SpatialTransformer(32, n_heads=2, d_head=8, context_dim=8)
    x = torch.randn(2, 32, 4, 3)
    assert torch.equal(st(x, torch.randn(2, 5, 8)), x)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_spatial_transformer_matches_reference(backend):
    torch.manual_seed(0)
    st = SpatialTransformer(32, n_heads=2, d_head=8, depth=2, context_dim=8)
    _perturb(st, seed=3)
    x, context = torch.randn(2, 32, 4, 3), torch.randn(2, 5, 8)
    with attention_backend(backend):
        out = st(x, context)
    expected = _ref_spatial_transformer(dict(st.named_parameters()), x, context, heads=2, depth=2)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_spatial_transformer_output_depends_on_context():
    torch.manual_seed(0)
    st = SpatialTransformer(32, n_heads=2, d_head=8, context_dim=8)
    _perturb(st, seed=4)
    x = torch.randn(1, 32, 4, 4)
    a = st(x, torch.randn(1, 5, 8))
    b = st(x, torch.randn(1, 5, 8))
    assert a.shape == x.shape
    assert (a - b).abs().max() > 1e-3
