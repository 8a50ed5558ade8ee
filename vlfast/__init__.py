"""vlfast: fused GPU kernels for the layers of segmentation U-Nets, VAEs and DDPM diffusion models."""

__version__ = "0.1.0"

from . import backends, nn, ops, schedulers
from .backends import last_backend, use_backend

__all__ = ["backends", "nn", "ops", "schedulers", "use_backend", "last_backend", "__version__"]
