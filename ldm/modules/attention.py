"""Cross-attention transformer of the LDM UNet (Rombach et al. 2022, sec. 3.3, eq. 3).

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V,
    Q = W_Q phi(z_t),  K = W_K tau(y),  V = W_V tau(y)

`phi(z_t)` is the flattened UNet feature map (`x` below) and `tau(y)` the conditioning tokens
(`context`, e.g. BERT outputs). Module names, parameter names and numerics match CompVis
`ldm/modules/attention.py`, so CompVis checkpoints load with `load_state_dict(strict=True)`.

Two interchangeable attention kernels sit behind `attention()`:
- "sdpa": `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels
  on the GPU), the default;
- "math": explicit matmul + softmax, for exporters and runtimes that lack a fused kernel.
Pick one globally with `set_attention_backend("math")` or for a block of code with
`with attention_backend("math"): torch.onnx.export(...)`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

AttentionBackend = Literal["sdpa", "math"]
ATTENTION_BACKENDS: tuple[AttentionBackend, ...] = ("sdpa", "math")
_backend: AttentionBackend = "sdpa"


def set_attention_backend(name: AttentionBackend) -> None:
    """Choose the kernel every attention layer uses from now on: "sdpa" or "math"."""
    global _backend
    if name not in ATTENTION_BACKENDS:
        allowed = list(ATTENTION_BACKENDS)
        raise ValueError(f"unknown attention backend {name!r} (allowed: {allowed})")
    _backend = name


def get_attention_backend() -> AttentionBackend:
    """The kernel attention layers use now."""
    return _backend


@contextlib.contextmanager
def attention_backend(name: AttentionBackend) -> Iterator[None]:
    """Use kernel `name` inside the `with` block, then restore the previous one."""
    previous = _backend
    set_attention_backend(name)
    try:
        yield
    finally:
        set_attention_backend(previous)


def math_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None = None
) -> Tensor:
    """softmax(q k^T * scale) v with plain matmuls; shapes as in `attention`.

    sqrt(scale) multiplies q and k separately (as CompVis's QKVAttention does) so fp16 logits do
    not overflow, and softmax runs in float32.
    """
    s = scale**0.5
    sim = (q * s) @ (k * s).transpose(-1, -2)  # (B, H, Lq, Lk)
    if mask is not None:
        sim = sim.masked_fill(~mask[:, None, None, :], -torch.finfo(sim.dtype).max)
    weights = sim.float().softmax(dim=-1).to(v.dtype)
    return weights @ v


def sdpa_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None = None
) -> Tensor:
    """softmax(q k^T * scale) v with PyTorch's fused kernel; shapes as in `attention`."""
    attn_mask = None if mask is None else mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor | None = None) -> Tensor:
    """Multi-head attention with the current backend.

    q: (B, H, Lq, d), k and v: (B, H, Lk, d), mask: (B, Lk) bool, True = attend.
    Returns (B, H, Lq, d).
    """
    if _backend == "math":
        return math_attention(q, k, v, scale, mask)
    return sdpa_attention(q, k, v, scale, mask)


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020): x W_a * gelu(x W_b); one Linear holds W_a and W_b."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        """(..., dim_in) -> (..., dim_out)."""
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP: project in (GEGLU or Linear+GELU), dropout, project out.

    Keys: `net.0.proj.*` (glu) or `net.0.0.*` (no glu), and `net.2.*`.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int | None = None,
        mult: int = 4,
        glu: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = dim if dim_out is None else dim_out
        project_in = (
            GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        )
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x: Tensor) -> Tensor:
        """(..., dim) -> (..., dim_out)."""
        return self.net(x)


class CrossAttention(nn.Module):
    """Multi-head attention of queries from `x` over keys/values from `context` (eq. 3).

    Self-attention when `context` is None. `to_q`, `to_k`, `to_v` are W_Q, W_K, W_V (no bias);
    `to_out` = (Linear, Dropout) is the output projection W_O.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.scale = dim_head**-0.5  # 1/sqrt(d) of eq. 3
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(
        self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """x: (B, N, query_dim), context: (B, M, context_dim), mask: (B, M) bool (True = attend).

        Returns (B, N, query_dim).
        """
        context = x if context is None else context
        # 'b n (h d) -> b h n d'; written with unflatten/transpose so ONNX keeps B, N, M dynamic.
        q, k, v = (
            t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
            for t in (self.to_q(x), self.to_k(context), self.to_v(context))
        )
        out = attention(q, k, v, self.scale, mask)
        out = out.transpose(1, 2).flatten(2)  # 'b h n d -> b n (h d)'
        return self.to_out(out)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention, gated feed-forward.

    `attn2` falls back to self-attention when no context is given.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        gated_ff: bool = True,
        checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(
            dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout
        )
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """x: (B, N, dim), context: (B, M, context_dim) -> (B, N, dim)."""
        if self.checkpoint and self.training and torch.is_grad_enabled():
            # Trade compute for memory: recompute activations in the backward pass.
            return checkpoint(self._forward, x, context, use_reentrant=False)
        return self._forward(x, context)

    def _forward(self, x: Tensor, context: Tensor | None) -> Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        x = self.ff(self.norm3(x)) + x
        return x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on `context` tokens.

    GroupNorm -> 1x1 conv to n_heads*d_head channels -> `depth` transformer blocks on the
    (H*W) tokens -> 1x1 conv back -> residual. `proj_out` starts at zero, so a freshly built
    block is the identity.
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | None = None,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        inner_dim = n_heads * d_head
        self.norm = nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)
        self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim,
                n_heads,
                d_head,
                dropout=dropout,
                context_dim=context_dim,
                checkpoint=use_checkpoint,
            )
            for _ in range(depth)
        )
        self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W), context: (B, M, context_dim) -> (B, C, H, W)."""
        h, w = x.shape[2:]
        x_in = x
        x = self.proj_in(self.norm(x))
        x = x.flatten(2).transpose(1, 2)  # 'b c h w -> b (h w) c'
        for block in self.transformer_blocks:
            x = block(x, context=context)
        x = x.transpose(1, 2).unflatten(2, (h, w))  # 'b (h w) c -> b c h w'
        return self.proj_out(x) + x_in
