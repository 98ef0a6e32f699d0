"""Building blocks of the LDM UNet (`ldm.modules.unet.UNetModel`), CompVis names and numerics.

Match CompVis `ldm/modules/diffusionmodules/openaimodel.py` and its `util.py` (Dhariwal &
Nichol 2021's ADM blocks), so a UNet built from them loads CompVis checkpoints with
`load_state_dict(strict=True)`. Symbols: t the timestep, emb = time_embed(gamma(t)) its
embedding (gamma: `timestep_embedding`), x / h a feature map and its residual branch.

    normalization, GroupNorm32        the norm layer (32 groups, float32 statistics)
    conv_nd, avg_pool_nd, zero_module layer helpers for dims = 1 / 2 / 3
    timestep_embedding                gamma(t): sinusoidal embedding of t
    TimestepBlock, TimestepEmbedSequential   layers fed emb (and the context)
    Upsample, Downsample              x2 resizing
    ResBlock                          residual block conditioned on emb
    QKVAttention(Legacy), AttentionBlock     self-attention without context
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm.modules.attention import SpatialTransformer, attention


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (stable statistics in fp16)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """The UNet's norm layer: 32 groups, eps 1e-5, affine."""
    return GroupNorm32(32, channels)


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """nn.Conv1d / Conv2d / Conv3d for `dims` = 1 / 2 / 3."""
    convs = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    if dims not in convs:
        raise ValueError(f"unsupported dims {dims} (allowed: [1, 2, 3])")
    return convs[dims](*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """nn.AvgPool1d / 2d / 3d for `dims` = 1 / 2 / 3."""
    pools = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
    if dims not in pools:
        raise ValueError(f"unsupported dims {dims} (allowed: [1, 2, 3])")
    return pools[dims](*args, **kwargs)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters so its residual branch starts as a no-op."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(timesteps: Tensor, dim: int, max_period: int = 10000) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, CompVis order: cos, then sin.

    timesteps: (B,) -> (B, dim) float32, with frequencies
    w_i = max_period ** (-i / half), i < half = dim // 2; an odd `dim` gets a zero last column.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepBlock(nn.Module):
    """Marker: a module whose forward takes the timestep embedding as second argument."""


class TimestepEmbedSequential(nn.Sequential):
    """nn.Sequential that feeds `emb` to TimestepBlocks and `context` to SpatialTransformers."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None = None) -> Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, then an optional 3x3 conv.

    For dims=3 only the inner two (spatial) axes are upsampled.
    """

    def __init__(
        self,
        channels: int,
        use_conv: bool,
        dims: int = 2,
        out_channels: int | None = None,
        padding: int = 1,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, channels, self.out_channels, 3, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, *S) -> (B, C_out, *2S)."""
        if self.dims == 3:
            x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """x2 downsampling by a strided 3x3 conv (`use_conv`) or average pooling.

    For dims=3 only the inner two (spatial) axes are downsampled.
    """

    def __init__(
        self,
        channels: int,
        use_conv: bool,
        dims: int = 2,
        out_channels: int | None = None,
        padding: int = 1,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = (1, 2, 2) if dims == 3 else 2
        if use_conv:
            self.op = conv_nd(dims, channels, self.out_channels, 3, stride=stride, padding=padding)
        else:
            if self.out_channels != channels:
                raise ValueError("average-pool downsampling cannot change the channel count")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, *S) -> (B, C_out, *S/2)."""
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding, optionally resizing x2.

    h = conv(SiLU(norm(x))); h += emb (or, with use_scale_shift_norm, FiLM:
    norm(h) * (1 + scale) + shift); h = conv(dropout(SiLU(norm(h)))); out = skip(x) + h.
    With `up`/`down` both h (between SiLU and the first conv) and x are resized without a conv.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        out_ch = self.out_channels

        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), conv_nd(dims, channels, out_ch, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        # FiLM needs a scale and a shift per channel, plain addition only a shift.
        emb_out = 2 * out_ch if use_scale_shift_norm else out_ch
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(out_ch),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, out_ch, out_ch, 3, padding=1)),
        )
        if out_ch == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, out_ch, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x: (B, C, *S), emb: (B, emb_channels) -> (B, C_out, *S') with S' = S, 2S or S/2."""
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.updown:
            norm, act, conv = self.in_layers
            h = self.h_upd(act(norm(x)))
            x = self.x_upd(x)
            h = conv(h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out[(...,) + (None,) * (h.ndim - 2)]  # (B, C) -> (B, C, 1, ..., 1)
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class QKVAttentionLegacy(nn.Module):
    """Attention on a fused qkv tensor laid out heads first: (B, H * 3 * C, T)."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: Tensor) -> Tensor:
        """(B, H*3*C, T) -> (B, H*C, T)."""
        # '(h three c) t -> three h t c' per batch element.
        q, k, v = qkv.unflatten(1, (self.n_heads, -1)).transpose(2, 3).chunk(3, dim=-1)
        a = attention(q, k, v, scale=q.shape[-1] ** -0.5)  # (B, H, T, C)
        return a.transpose(2, 3).flatten(1, 2)


class QKVAttention(nn.Module):
    """Attention on a fused qkv tensor laid out q/k/v first: (B, 3 * H * C, T)."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: Tensor) -> Tensor:
        """(B, 3*H*C, T) -> (B, H*C, T)."""
        # '(three h c) t -> three h t c' per batch element.
        q, k, v = (t.unflatten(1, (self.n_heads, -1)).transpose(2, 3) for t in qkv.chunk(3, dim=1))
        a = attention(q, k, v, scale=q.shape[-1] ** -0.5)  # (B, H, T, C)
        return a.transpose(2, 3).flatten(1, 2)


class AttentionBlock(nn.Module):
    """Self-attention over the positions of a feature map (no context), with a residual.

    Heads: `channels // num_head_channels` if num_head_channels != -1, else `num_heads`.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ) -> None:
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(
                    f"channels {channels} not divisible by num_head_channels {num_head_channels}"
                )
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.attention = (
            QKVAttention(self.num_heads)
            if use_new_attention_order
            else QKVAttentionLegacy(self.num_heads)
        )
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, *S) -> (B, C, *S)."""
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        flat = x.flatten(2)  # (B, C, T)
        h = self.proj_out(self.attention(self.qkv(self.norm(flat))))
        return (flat + h).reshape(x.shape)
