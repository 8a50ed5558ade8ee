"""The DDPM U-Net of Ho, Jain and Abbeel (NeurIPS 2020) and its training step and sampling loop.

The defaults are the paper's CIFAR-10 network (35.7M parameters): base width 128, widths 128 * (1, 2, 2, 2)
at resolutions 32, 16, 8, 4, two residual blocks per level, self-attention at 16x16 (and in the middle),
GroupNorm(32), dropout 0.1, a sinusoidal timestep embedding through a two-layer MLP (SiLU) added inside
every residual block. Initialisation is PyTorch's default (the paper zero-initialises each block's last
convolution and the output convolution, which would make an untrained model's output identically 0).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..sampling import sample


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """(B,) timesteps -> (B, dim) float32 ``[sin(t * f), cos(t * f)]``, ``f_i = max_period ** (-i / (dim/2 - 1))``
    (the Transformer's sinusoidal embedding as DDPM writes it). dim even."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResBlock(nn.Module):
    """x + F(x, temb): GroupNorm, SiLU, 3x3 conv, + Linear(SiLU(temb)) per channel, GroupNorm, SiLU,
    dropout, 3x3 conv; a 1x1 conv on the skip where the width changes. (N, in_ch, H, W) -> (N, out_ch, H, W)."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """x + single-head self-attention over the H * W positions (GroupNorm, 1x1 q, k, v, softmax(q k^T / sqrt(C)),
    1x1 output projection). (N, C, H, W) -> (N, C, H, W)."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.q, self.k, self.v = nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1), nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        n, c, hgt, wid = x.shape
        h = self.norm(x)
        q = self.q(h).flatten(2).transpose(1, 2)  # (N, HW, C)
        k = self.k(h).flatten(2)                  # (N, C, HW)
        v = self.v(h).flatten(2).transpose(1, 2)  # (N, HW, C)
        w = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=-1)
        h = torch.bmm(w, v).transpose(1, 2).reshape(n, c, hgt, wid)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """3x3 stride-2 convolution: (N, C, H, W) -> (N, C, H/2, W/2)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 convolution: (N, C, H, W) -> (N, C, 2H, 2W)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DDPMUNet(nn.Module):
    """DDPM's noise predictor eps_theta: ``forward(x, t)`` -> predicted noise, the shape of x.

    x: (N, in_channels, R, R) with R = ``resolution`` (attention levels are chosen by resolution; any R
    divisible by 2**(len(ch_mult) - 1) runs); t: int, 0-d or (N,) integer tensor of timesteps.
    A small test configuration: ``DDPMUNet(ch=32, ch_mult=(1, 2), attn_resolutions=(16,), num_res_blocks=1,
    groups=8, resolution=32)``.
    """

    def __init__(self, in_channels: int = 3, out_channels: int | None = None, ch: int = 128, ch_mult=(1, 2, 2, 2),
                 num_res_blocks: int = 2, attn_resolutions=(16,), dropout: float = 0.1, resolution: int = 32,
                 groups: int = 32):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.ch = ch
        temb_ch = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        def block(i, o):
            return ResBlock(i, o, temb_ch, dropout, groups)

        # Encoder: every block's output is a skip for the decoder (conv_in's and the downsamplings' too).
        self.down = nn.ModuleList()
        skips, cur, res = [ch], ch, resolution
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(block(cur, ch * mult))
                cur = ch * mult
                if res in attn_resolutions:
                    self.down.append(AttnBlock(cur, groups))
                skips.append(cur)
            if level != len(ch_mult) - 1:
                self.down.append(Downsample(cur))
                skips.append(cur)
                res //= 2
        self.mid = nn.ModuleList([block(cur, cur), AttnBlock(cur, groups), block(cur, cur)])
        # Decoder: num_res_blocks + 1 blocks per level, each on [h, skip] concatenated.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(block(cur + skips.pop(), ch * mult))
                cur = ch * mult
                if res in attn_resolutions:
                    self.up.append(AttnBlock(cur, groups))
            if level != 0:
                self.up.append(Upsample(cur))
                res *= 2
        self.norm_out = nn.GroupNorm(groups, cur)
        self.conv_out = nn.Conv2d(cur, out_channels, 3, padding=1)

    def forward(self, x: Tensor, t) -> Tensor:
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        temb = self.temb(timestep_embedding(t, self.ch).to(x.dtype))
        h = self.conv_in(x)
        hs = [h]
        for m in self.down:
            if isinstance(m, AttnBlock):
                h = hs[-1] = m(h)  # attention refines the block's output, which is the skip
                continue
            h = m(h, temb) if isinstance(m, ResBlock) else m(h)
            hs.append(h)
        for m in self.mid:
            h = m(h, temb) if isinstance(m, ResBlock) else m(h)
        for m in self.up:
            if isinstance(m, ResBlock):
                h = m(torch.cat([h, hs.pop()], dim=1), temb)
            else:
                h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def _alphas_cumprod(schedule) -> Tensor:
    return schedule.alphas_cumprod if hasattr(schedule, "alphas_cumprod") else torch.as_tensor(schedule)


def ddpm_train_step(model: nn.Module, x0: Tensor, schedule, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator | None = None) -> Tensor:
    """One step of DDPM's Algorithm 1; returns the loss (0-d, detached).

    x0: (B, C, H, W) data; schedule: a scheduler with ``alphas_cumprod`` (vlfast's or diffusers') or the
    (T,) alphas_cumprod tensor itself. t ~ U{0, ..., T-1} (0-based, as diffusers counts), eps ~ N(0, I),
    x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, loss = mean((eps - model(x_t, t))^2), one optimizer step.
    """
    ab_all = _alphas_cumprod(schedule).to(device=x0.device, dtype=torch.float32)
    b = x0.shape[0]
    t = torch.randint(0, ab_all.shape[0], (b,), generator=generator, device=x0.device)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    ab = ab_all[t].to(x0.dtype).view(b, *([1] * (x0.dim() - 1)))
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    loss = F.mse_loss(model(x_t, t), eps)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def ddpm_sample(model: nn.Module, shape, scheduler, generator=None, num_inference_steps: int | None = None,
                device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """DDPM's Algorithm 2 with a vlfast or diffusers DDPMScheduler; returns x_0 of ``shape``: the plain loop of
    :func:`vlfast.sampling.sample` (no CUDA graph, no progress bar), over all ``num_train_timesteps`` steps
    unless ``num_inference_steps`` says fewer::

        scheduler.set_timesteps(num_inference_steps)
        x = randn_tensor(shape, generator)            # x_T ~ N(0, I), as diffusers draws it
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t), t, x, generator=generator).prev_sample
    """
    steps = num_inference_steps or scheduler.config.num_train_timesteps
    return sample(model, scheduler, shape, generator=generator, num_inference_steps=steps, cuda_graph=False,
                  progress=False, device=device, dtype=dtype)
