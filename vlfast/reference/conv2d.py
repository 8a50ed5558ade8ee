"""Convolution (dilated or not) with a fused residual add, activation and output buffer, as plain PyTorch.

The spec every backend follows, for input (N, Cin, H, W) or (Cin, H, W) and weight
(Cout, Cin/groups, KH, KW)::

    y   = F.conv2d(input, weight, bias, stride, padding, dilation, groups)   # padding: ints, "same", "valid"
    y   = y + residual           # when given: a tensor of y's shape (a U-Net/ResNet skip)
    y   = activation(y)          # None, "relu", "silu" or "gelu" (erf)
    out.copy_(y)                 # when out= is given (any strides, e.g. a channel slice of a concat buffer)

Output size per axis: (H + 2*padding - dilation*(KH - 1) - 1) // stride + 1. ``padding="same"`` with an
even dilated kernel extent pads one more row/column at the bottom/right, as PyTorch does.
"""

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from ..activations import NAMES as ACTIVATIONS
from ..activations import activate

__all__ = ["ACTIVATIONS", "activate", "conv2d"]


def conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1,
           groups: int = 1, *, activation: Optional[str] = None, residual: Optional[Tensor] = None,
           out: Optional[Tensor] = None) -> Tensor:
    """``activation(F.conv2d(...) + residual)``, written into ``out`` when given (and then returned)."""
    y = F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        y = y + residual
    y = activate(y, activation)
    if out is None:
        return y
    return out.copy_(y)
