"""KL-regularised autoencoder, the first stage of latent diffusion (Rombach et al. 2022, Sec. 3).

x (B, 3, H, W) in [-1, 1] -> q(z|x) = N(mean, var) with z (B, embed_dim, H/f, W/f) -> x_rec.
Checkpoint-compatible with CompVis `ldm.models.autoencoder.AutoencoderKL`: state-dict keys
`encoder.*`, `decoder.*`, `loss.*` (training only), `quant_conv.*`, `post_quant_conv.*`.

    model = AutoencoderKL(AutoencoderConfig(ddconfig=DDConfig(...), embed_dim=4))
    posterior = model.encode(x)            # DiagonalGaussianDistribution
    x_rec = model.decode(posterior.sample())
"""

from __future__ import annotations

from torch import Tensor, nn

from ldm.config import AutoencoderConfig
from ldm.modules.autoencoder_blocks import Decoder, Encoder
from ldm.modules.distributions import DiagonalGaussianDistribution


class AutoencoderKL(nn.Module):
    """Encoder + 1x1 `quant_conv` to moments; 1x1 `post_quant_conv` + decoder back to pixels.

    `self.loss` (an `LPIPSWithDiscriminator`) exists only when `cfg.lossconfig` is set: inside
    an LDM the first stage has no loss, like CompVis's `lossconfig: torch.nn.Identity`.
    """

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        dd = cfg.ddconfig
        if not dd.double_z:
            # The posterior needs both a mean and a log-variance per latent channel.
            raise ValueError("AutoencoderKL needs ddconfig.double_z = true")
        self.cfg = cfg
        self.embed_dim = cfg.embed_dim
        self.encoder = Encoder(dd)
        self.decoder = Decoder(dd)
        if cfg.lossconfig is not None:
            # Imported here so inference never pulls in the perceptual network's code.
            from ldm.modules.losses.lpips_disc import LPIPSWithDiscriminator

            self.loss = LPIPSWithDiscriminator(cfg.lossconfig)
        self.quant_conv = nn.Conv2d(2 * dd.z_channels, 2 * cfg.embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, dd.z_channels, kernel_size=1)

    def encode(self, x: Tensor) -> DiagonalGaussianDistribution:
        """Image (B, C, H, W) in [-1, 1] -> posterior over z (B, embed_dim, H/f, W/f)."""
        moments = self.quant_conv(self.encoder(x))  # (B, 2 embed_dim, H/f, W/f)
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: Tensor) -> Tensor:
        """Latent (B, embed_dim, h, w) -> image (B, out_ch, h*f, w*f), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: Tensor, sample_posterior: bool = True
    ) -> tuple[Tensor, DiagonalGaussianDistribution]:
        """Reconstruct x from a posterior sample (or its mean); returns (x_rec, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def get_last_layer(self) -> nn.Parameter:
        """Weight of the decoder's last conv; the loss balances the GAN term on its gradients."""
        return self.decoder.conv_out.weight

    @property
    def downsample_factor(self) -> int:
        """f: image side / latent side, 2 ** (len(ch_mult) - 1)."""
        return 2 ** (len(self.cfg.ddconfig.ch_mult) - 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(embed_dim, H/f, W/f) of the latent for an image of the given size."""
        f = self.downsample_factor
        return (self.embed_dim, height // f, width // f)
