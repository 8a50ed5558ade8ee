"""Fused versions of the model blocks vlfast knows, for :func:`vlfast.nn.convert`.

A block here is a subclass of the block it replaces, with the same constructor, attributes, parameters and
state_dict; ``convert()`` switches a block object's class in place, as it switches layers. Its ``forward``
runs the fused path where the block's parts are the plain layers the block was built with (torch's or
vlfast's GroupNorm and Conv2d, no hooks, no parametrization, an activation vlfast fuses) and the parent's
``forward`` otherwise, so that whatever a user attached to a part is honoured.

- diffusers' ``ResnetBlock2D``: ``norm1`` + activation in one kernel; ``norm2`` + the time-embedding add
  (or, for ``time_embedding_norm="scale_shift"``, the AdaGN scale-shift) + activation in one kernel; the
  shortcut added in ``conv2``'s epilogue (``vlfast.ops.conv2d(..., residual=)``) when
  ``output_scale_factor`` is 1.
- diffusers' ``Upsample2D`` (nearest 2x, then a 3x3 convolution): one stride-2 transposed convolution
  whose 4x4 weight is the 3x3 one folded onto the four output phases (:func:`upsample_conv_weight`): each
  output pixel takes 4 multiplies a channel instead of 9, and the upsampled tensor is never written.
- ``vlfast.models``' DDPM ``ResBlock`` and ``Upsample``: the same fusions.
- ``nn.Sequential`` holding Conv2d -> BatchNorm2d (and ``vlfast.models``' U-Net ``DoubleConv``): in eval mode
  the BatchNorm folded into the convolution and a following ReLU / SiLU / GELU in its epilogue, one kernel
  for three (:mod:`vlfast.blocks.sequential`); in training mode as it is.

diffusers' ``Downsample2D`` needs no block of its own: its convolution is converted by ``convert``'s
``conv2d`` rule like any other. Which blocks are known: :func:`drop_ins`.
"""

import sys

from torch import nn

from ._common import upsample_conv, upsample_conv_weight
from .sequential import Sequential, has_conv_batchnorm

__all__ = ["Sequential", "drop_ins", "fused_class", "upsample_conv", "upsample_conv_weight"]


def drop_ins() -> dict:
    """{block class: its fused subclass} for the block modules already imported (a model holding a diffusers
    or a ``vlfast.models`` block has imported its module; nothing is imported here for a model without)."""
    table = {}
    if "vlfast.models" in sys.modules:
        from . import models
        table.update(models.DROP_INS)
    if "diffusers.models.resnet" in sys.modules and "diffusers.models.upsampling" in sys.modules:
        from . import diffusers
        table.update(diffusers.DROP_INS)
    return table


def fused_class(module: nn.Module, table: dict):
    """The fused class for ``module`` (``table`` from :func:`drop_ins`), or None: its exact class's entry, or
    :class:`Sequential` for an exact ``nn.Sequential`` that holds a Conv2d -> BatchNorm2d pair."""
    if type(module) is nn.Sequential:
        return Sequential if has_conv_batchnorm(module) else None
    return table.get(type(module))
