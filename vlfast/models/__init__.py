"""The lecture's networks as readable PyTorch models of plain ``torch.nn`` layers.

Nothing here is fused: ``vlfast.nn.convert(model)`` is what makes a model run vlfast's kernels (it
switches the GroupNorm, ConvTranspose2d and dilated Conv2d modules; ``conv2d="all"`` every Conv2d).
Configurations are the papers'; weights are randomly initialised (nothing is downloaded).

``MODELS[name]()`` builds a small instance of each network and ``example_input(name, batch)`` the inputs
its ``forward`` takes, for tests, the profiler and benchmarks::

    model = vlfast.nn.convert(MODELS["unet"]().eval())
    out = model(*example_input("unet", batch=2))
"""

from typing import Callable

import torch
from torch import Tensor, nn

from .context import ASPP, ContextModule
from .ddpm_unet import DDPMUNet, ddpm_sample, ddpm_train_step, timestep_embedding
from .fcn import FCN8s, FCN32s, VGGBackbone, bilinear_kernel, bilinear_upsampler
from .unet import UNet
from .vae import ConvVAE, elbo_loss

__all__ = ["ASPP", "ContextModule", "ConvVAE", "DDPMUNet", "FCN8s", "FCN32s", "MODELS", "UNet", "VGGBackbone",
           "bilinear_kernel", "bilinear_upsampler", "ddpm_sample", "ddpm_train_step", "elbo_loss",
           "example_input", "timestep_embedding"]

_SMALL_VGG = {"backbone_channels": (8, 16, 16, 32, 32), "convs": (1, 1, 2, 2, 2), "fc_channels": 64, "fc_kernel": 3}

# name -> factory of a small instance (the papers' structure, narrow widths).
MODELS: dict[str, Callable[[], nn.Module]] = {
    "unet": lambda: UNet(3, 2, base=8),
    "fcn32s": lambda: FCN32s(5, **_SMALL_VGG),
    "fcn8s": lambda: FCN8s(5, **_SMALL_VGG),
    "context": lambda: ContextModule(8),
    "aspp": lambda: ASPP(16, out_channels=16),
    "vae": lambda: ConvVAE(3, latent_channels=4, base=16, levels=3, groups=8),
    "ddpm_unet": lambda: DDPMUNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), groups=8,
                                  resolution=32),
}

# name -> (channels, height, width) of the example input; for ddpm_unet also a timestep.
_INPUTS = {
    "unet": (3, 32, 32), "fcn32s": (3, 64, 64), "fcn8s": (3, 64, 64), "context": (8, 40, 40),
    "aspp": (16, 24, 24), "vae": (3, 32, 32), "ddpm_unet": (3, 32, 32),
}


def example_input(name: str, batch: int = 2, device=None, dtype: torch.dtype = torch.float32,
                  seed: int = 0) -> tuple[Tensor, ...]:
    """The positional arguments of ``MODELS[name]()``'s forward: ``(x,)``, or ``(x, t)`` for "ddpm_unet"
    (t: (batch,) int64 timesteps in [0, 1000)); drawn from a CPU generator seeded with ``seed``."""
    if name not in _INPUTS:
        raise KeyError(f"unknown model {name!r}; one of {sorted(_INPUTS)}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *_INPUTS[name]), generator=g, dtype=dtype).to(device)
    if name == "ddpm_unet":
        return x, torch.randint(0, 1000, (batch,), generator=g).to(device)
    return (x,)
