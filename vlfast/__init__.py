"""vlfast: fused GPU kernels for the layers of segmentation U-Nets, VAEs and DDPM diffusion models."""

import importlib

__version__ = "0.1.0"

from . import backends, nn, ops, tuning
from .backends import last_backend, use_backend

__all__ = ["backends", "nn", "ops", "schedulers", "tuning", "use_backend", "last_backend", "__version__"]


def __getattr__(name: str):
    # vlfast.schedulers loads on first use: with diffusers installed it builds on diffusers' config classes,
    # whose import takes a third of a second that a user of the layers alone need not pay.
    if name == "schedulers":
        return importlib.import_module(".schedulers", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
