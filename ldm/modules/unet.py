"""The LDM denoiser eps_theta(z_t, t, tau(y)): a UNet with timestep embedding and attention.

Rombach et al. 2022, sec. 3.3 and appendix; the architecture is the ADM UNet of Dhariwal &
Nichol 2021 with `SpatialTransformer` cross-attention blocks. Module names, nesting and
numerics match CompVis `ldm/modules/diffusionmodules/openaimodel.py` (and its `util.py`), so
CompVis checkpoints load with `load_state_dict(strict=True)`:

    time_embed.{0,2}                  t -> sinusoidal -> Linear, SiLU, Linear
    label_emb                         class embedding (num_classes set)
    input_blocks.{i}.{j}              conv_in, then per level: ResBlock [+ attention], Downsample
    middle_block.{0,1,2}              ResBlock, attention, ResBlock
    output_blocks.{i}.{j}             per level: ResBlock on [h, skip] [+ attention] [+ Upsample]
    out.{0,2}                         GroupNorm, SiLU, zero-initialised conv
    id_predictor.{0,1}                codebook logits (n_embed set)

Every `forward` is free of Python control flow on tensor values, so the model traces to ONNX
(run the export inside `ldm.modules.attention.attention_backend("math")` if the runtime lacks a
fused attention kernel). The blocks (ResBlock, Downsample, Upsample, AttentionBlock, the
timestep embedding, ...) are in `ldm.modules.unet_blocks` and re-exported here.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ldm.config import ConfigError, UNetConfig
from ldm.modules.attention import SpatialTransformer
from ldm.modules.unet_blocks import (
    AttentionBlock,
    Downsample,
    GroupNorm32,
    QKVAttention,
    QKVAttentionLegacy,
    ResBlock,
    TimestepBlock,
    TimestepEmbedSequential,
    Upsample,
    avg_pool_nd,
    conv_nd,
    normalization,
    timestep_embedding,
    zero_module,
)

# The blocks are re-exported: `from ldm.modules.unet import ResBlock` etc. keep working.
__all__ = [
    "AttentionBlock",
    "Downsample",
    "GroupNorm32",
    "QKVAttention",
    "QKVAttentionLegacy",
    "ResBlock",
    "TimestepBlock",
    "TimestepEmbedSequential",
    "UNetModel",
    "Upsample",
    "attention_heads",
    "avg_pool_nd",
    "conv_nd",
    "normalization",
    "timestep_embedding",
    "zero_module",
]


def attention_heads(
    ch: int, num_heads: int, num_head_channels: int, legacy: bool, use_spatial_transformer: bool
) -> tuple[int, int]:
    """(num_heads, dim_head) CompVis gives an attention layer on `ch` channels.

    A fixed head width (num_head_channels) wins over a fixed head count. `legacy` (the
    setting of all released checkpoints) recomputes dim_head: ch // num_heads for a
    SpatialTransformer, the raw num_head_channels (possibly -1) for an AttentionBlock, which
    then falls back to its num_heads argument.
    """
    if num_head_channels == -1:
        dim_head = ch // num_heads
    else:
        num_heads = ch // num_head_channels
        dim_head = num_head_channels
    if legacy:
        dim_head = ch // num_heads if use_spatial_transformer else num_head_channels
    return num_heads, dim_head


class UNetModel(nn.Module):
    """eps_theta(x_t, t, context[, y]): the conditional denoising UNet of LDM.

    Built exactly as CompVis builds it from the same hyperparameters (see `UNetConfig`).
    `use_fp16` is ignored: call `.half()` on the module instead.
    """

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        _validate(cfg)
        self.cfg = cfg
        self.image_size = cfg.image_size
        self.in_channels = cfg.in_channels
        self.model_channels = cfg.model_channels
        self.out_channels = cfg.out_channels
        self.num_classes = cfg.num_classes
        self.predict_codebook_ids = cfg.n_embed is not None

        mc, dims = cfg.model_channels, cfg.dims
        # Deprecated ADM option: another head count for decoder AttentionBlocks (see
        # `attention_heads` for when it still matters).
        num_heads_upsample = cfg.num_heads_upsample
        if num_heads_upsample == -1:
            num_heads_upsample = cfg.num_heads
        time_embed_dim = mc * 4
        self.time_embed = nn.Sequential(
            nn.Linear(mc, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, time_embed_dim)

        def res_block(ch_in: int, ch_out: int, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(
                ch_in,
                time_embed_dim,
                cfg.dropout,
                out_channels=ch_out,
                dims=dims,
                use_checkpoint=cfg.use_checkpoint,
                use_scale_shift_norm=cfg.use_scale_shift_norm,
                up=up,
                down=down,
            )

        def attn_block(ch: int, upsample_path: bool = False) -> nn.Module:
            num_heads, dim_head = attention_heads(
                ch, cfg.num_heads, cfg.num_head_channels, cfg.legacy, cfg.use_spatial_transformer
            )
            if cfg.use_spatial_transformer:
                return SpatialTransformer(
                    ch,
                    num_heads,
                    dim_head,
                    depth=cfg.transformer_depth,
                    dropout=0.0,  # CompVis never passes dropout here
                    context_dim=cfg.context_dim,
                    use_checkpoint=cfg.use_checkpoint,
                )
            return AttentionBlock(
                ch,
                num_heads=num_heads_upsample if upsample_path else cfg.num_heads,
                num_head_channels=dim_head,
                use_checkpoint=cfg.use_checkpoint,
                use_new_attention_order=cfg.use_new_attention_order,
            )

        # Encoder. `ds` is the downsampling factor so far; attention_resolutions lists factors.
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, cfg.in_channels, mc, 3, padding=1))]
        )
        skip_chans = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [res_block(ch, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(attn_block(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                down = (
                    res_block(ch, ch, down=True)
                    if cfg.resblock_updown
                    else Downsample(ch, cfg.conv_resample, dims=dims, out_channels=ch)
                )
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(ch, ch), attn_block(ch), res_block(ch, ch)
        )

        # Decoder: each block eats the matching encoder output (skip connection) too.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res_block(ch + skip_chans.pop(), mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(attn_block(ch, upsample_path=True))
                if level and i == cfg.num_res_blocks:
                    up = (
                        res_block(ch, ch, up=True)
                        if cfg.resblock_updown
                        else Upsample(ch, cfg.conv_resample, dims=dims, out_channels=ch)
                    )
                    layers.append(up)
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        # CompVis sizes the norm by `ch` but the conv by model_channels (equal when
        # channel_mult[0] == 1, as in every released config).
        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, mc, cfg.out_channels, 3, padding=1)),
        )
        if self.predict_codebook_ids:
            self.id_predictor = nn.Sequential(
                normalization(ch), conv_nd(dims, mc, cfg.n_embed, 1)
            )

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor | None = None,
        y: Tensor | None = None,
    ) -> Tensor:
        """Predict the noise eps (or codebook logits when n_embed is set).

        x: (B, in_channels, H, W) noisy latent z_t; timesteps: (B,) int or float;
        context: (B, L, context_dim) tau(y) tokens; y: (B,) class labels iff num_classes.
        Returns (B, out_channels, H, W) (or (B, n_embed, H, W)).
        """
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass y if and only if the model is class-conditional (num_classes)")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)

        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.id_predictor(h) if self.predict_codebook_ids else self.out(h)


def _validate(cfg: UNetConfig) -> None:
    """Reject configs CompVis would assert on, with a message naming the keys."""
    if cfg.use_spatial_transformer and cfg.context_dim is None:
        raise ConfigError("unet.use_spatial_transformer needs unet.context_dim")
    if cfg.context_dim is not None and not cfg.use_spatial_transformer:
        raise ConfigError("unet.context_dim is set but unet.use_spatial_transformer is false")
    if cfg.num_heads == -1 and cfg.num_head_channels == -1:
        raise ConfigError("set unet.num_heads or unet.num_head_channels")
    if cfg.dims not in (1, 2, 3):
        raise ConfigError(f"unet.dims: {cfg.dims} is not one of [1, 2, 3]")
