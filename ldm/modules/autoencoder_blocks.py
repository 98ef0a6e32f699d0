"""Convolutional encoder and decoder of the KL autoencoder (the first stage of an LDM).

The encoder maps an image x (B, in_channels, H, W) to latent moments (B, 2 z_channels, H/f, W/f)
with f = 2 ** (len(ch_mult) - 1) (Rombach et al. 2022, Sec. 3); the decoder maps z back.
Module names and nesting reproduce CompVis `ldm/modules/diffusionmodules/model.py`, so CompVis
checkpoints load unchanged, e.g. `down.1.block.0.nin_shortcut.weight`, `mid.attn_1.q.weight`,
`up.0.upsample.conv.weight`. The time-embedding path of CompVis's blocks is dropped: the
autoencoder builds them with `temb_channels=0`, which creates no parameters.
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ldm.config import DDConfig


def Normalize(in_channels: int) -> nn.GroupNorm:  # noqa: N802 (CompVis's name)
    """GroupNorm with 32 groups and eps=1e-6, as in every CompVis autoencoder block."""
    return nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: x + conv(swish(norm(conv(swish(norm(x)))))).

    A 1x1 `nin_shortcut` projects x when the channel count changes. (B, C_in, H, W) ->
    (B, C_out, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W pixels, with a residual connection.

    q, k, v and the output projection are 1x1 convolutions over C channels; scores are scaled
    by C ** -0.5. (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, in_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        _, _, height, width = x.shape
        h = self.norm(x)
        # One head whose width is all C channels: (B, 1, H*W, C).
        q, k, v = (rearrange(f(h), "b c x y -> b 1 (x y) c") for f in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        out = rearrange(out, "b 1 (x y) c -> b c x y", x=height, y=width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 convolution.

    Like CompVis (after the original TF DDPM's "SAME" padding), the input is zero-padded by
    one pixel on the right and bottom only, so output pixel (i, j) sees input rows/columns
    2i .. 2i+2 and 2j .. 2j+2. (B, C, H, W) -> (B, C, H // 2, W // 2).
    """

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour repetition, then a 3x3 convolution."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution of the encoder or decoder: `block`s, `attn`s, optional resampler.

    CompVis builds this as a bare `nn.Module` with attributes `block`, `attn` and
    `downsample` / `upsample`; the attribute names are state-dict keys.
    """

    def __init__(self, blocks: list[ResnetBlock], attns: list[AttnBlock]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        # Either empty or one attention after every block (at resolutions in attn_resolutions).
        self.attn = nn.ModuleList(attns)

    def run_blocks(self, h: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    """Bottleneck: ResnetBlock, AttnBlock, ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2 z_channels, H/f, W/f), f = 2**(L-1).

    Level i has `num_res_blocks` ResnetBlocks with ch * ch_mult[i] output channels, attention
    after each block if its resolution is in `attn_resolutions`, and (except the last level)
    a Downsample. With `double_z` the output holds the mean and log-variance of q(z|x).
    """

    def __init__(self, cfg: DDConfig):
        super().__init__()
        self.ch = cfg.ch
        self.num_resolutions = len(cfg.ch_mult)
        self.num_res_blocks = cfg.num_res_blocks
        self.resolution = cfg.resolution
        self.in_channels = cfg.in_channels

        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, kernel_size=3, padding=1)

        in_ch_mult = (1, *cfg.ch_mult)
        curr_res = cfg.resolution
        block_in = cfg.ch
        self.down = nn.ModuleList()
        for i_level, mult in enumerate(cfg.ch_mult):
            block_in = cfg.ch * in_ch_mult[i_level]
            block_out = cfg.ch * mult
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if curr_res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _Level(blocks, attns)
            if i_level != self.num_resolutions - 1:
                level.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(level)

        self.mid = _Mid(block_in, cfg.dropout)
        self.norm_out = Normalize(block_in)
        z_out = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
        self.conv_out = nn.Conv2d(block_in, z_out, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for i_level, level in enumerate(self.down):
            h = level.run_blocks(h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f), f = 2**(L-1).

    Mirrors the encoder with `num_res_blocks + 1` blocks per level. As in CompVis, levels are
    built from the lowest resolution up but stored so that `up[i]` is level i (the one with
    ch * ch_mult[i] channels); the forward pass runs `up[L-1]` first.
    """

    def __init__(self, cfg: DDConfig):
        super().__init__()
        self.ch = cfg.ch
        self.num_resolutions = len(cfg.ch_mult)
        self.num_res_blocks = cfg.num_res_blocks
        self.resolution = cfg.resolution
        self.in_channels = cfg.in_channels

        block_in = cfg.ch * cfg.ch_mult[-1]
        curr_res = cfg.resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, cfg.z_channels, curr_res, curr_res)

        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, kernel_size=3, padding=1)
        self.mid = _Mid(block_in, cfg.dropout)

        levels: list[_Level] = []
        for i_level in reversed(range(self.num_resolutions)):
            block_out = cfg.ch * cfg.ch_mult[i_level]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if curr_res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _Level(blocks, attns)
            if i_level != 0:
                level.upsample = Upsample(block_in)
                curr_res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            h = level.run_blocks(h)
            if i_level != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


__all__ = [
    "AttnBlock",
    "Decoder",
    "Downsample",
    "Encoder",
    "Normalize",
    "ResnetBlock",
    "Upsample",
]
