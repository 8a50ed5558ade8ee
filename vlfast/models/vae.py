"""A convolutional variational autoencoder and the lecture's ELBO loss.

Encoder: ``levels`` stride-2 convolutions (kernel 4, padding 1), each followed by GroupNorm and SiLU,
then a 3x3 convolution to ``2 * latent_channels`` channels split into mu and logvar: a spatial latent of
stride 2**levels. Decoder: a 3x3 convolution from the latent, then ``levels`` ``nn.ConvTranspose2d(k=4,
s=2, p=1)`` upsamplings (GroupNorm + SiLU after all but the last, which gives the image's channels).
"""

import torch
from torch import Tensor, nn


def _norm_act(ch: int, groups: int) -> list:
    return [nn.GroupNorm(min(groups, ch), ch), nn.SiLU()]


class ConvVAE(nn.Module):
    """(N, in_channels, H, W) -> (recon (N, in_channels, H, W), mu, logvar (N, latent_channels, H/s, W/s)),
    s = 2**levels; H, W divisible by s. Widths base * 2**i at level i; ``groups`` GroupNorm groups
    (must divide every width).

    ``forward(x, generator=None)``: in training mode z = mu + exp(logvar / 2) * eps, eps ~ N(0, I) drawn
    with ``generator``; in eval mode z = mu (the decoder of the posterior's mean), so eval is deterministic.
    """

    def __init__(self, in_channels: int = 3, latent_channels: int = 4, base: int = 32, levels: int = 3,
                 groups: int = 8):
        super().__init__()
        widths = [base * 2 ** i for i in range(levels)]
        enc, prev = [], in_channels
        for w in widths:
            enc += [nn.Conv2d(prev, w, 4, stride=2, padding=1), *_norm_act(w, groups)]
            prev = w
        enc.append(nn.Conv2d(prev, 2 * latent_channels, 3, padding=1))
        self.encoder = nn.Sequential(*enc)
        dec = [nn.Conv2d(latent_channels, prev, 3, padding=1), *_norm_act(prev, groups)]
        for i in reversed(range(levels)):
            out = widths[i - 1] if i > 0 else in_channels
            dec.append(nn.ConvTranspose2d(prev, out, 4, stride=2, padding=1))
            if i > 0:
                dec += _norm_act(out, groups)
            prev = out
        self.decoder = nn.Sequential(*dec)
        self.latent_channels = latent_channels

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, logvar), each (N, latent_channels, H/s, W/s)."""
        return self.encoder(x).chunk(2, dim=1)

    def reparameterize(self, mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """mu + exp(logvar / 2) * eps, eps ~ N(0, I): the reparameterisation trick."""
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar, generator) if self.training else mu
        return self.decode(z), mu, logvar


def elbo_loss(x: Tensor, recon: Tensor, mu: Tensor, logvar: Tensor, kl_weight: float = 1.0) -> Tensor:
    """The lecture's negative ELBO, ``||x - recon||^2 + kl_weight * KL[N(mu, sigma^2) || N(0, I)]``, each
    summed over a sample's elements and averaged over the batch; a 0-d tensor. Equivalent code:
    ``rec = ((x - recon) ** 2).flatten(1).sum(1)``;
    ``kl = (0.5 * (mu ** 2 + logvar.exp() - logvar - 1)).flatten(1).sum(1)``; ``(rec + kl_weight * kl).mean()``.
    """
    rec = (x - recon).pow(2).flatten(1).sum(1)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).flatten(1).sum(1)
    return (rec + kl_weight * kl).mean()
