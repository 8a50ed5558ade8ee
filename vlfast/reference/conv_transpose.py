"""Transposed convolution with a fused activation and an optional output buffer, as plain PyTorch.

The spec every backend follows, for input (N, Cin, H, W) or (Cin, H, W) and weight
(Cin, Cout/groups, KH, KW)::

    y   = F.conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups, dilation)
    y   = activation(y)          # None, "relu", "silu" or "gelu" (erf)
    out.copy_(y)                 # when out= is given (any strides, e.g. a channel slice of a concat buffer)

Output size per axis: (H - 1)*stride - 2*padding + dilation*(KH - 1) + output_padding + 1.
"""

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from ..activations import NAMES as ACTIVATIONS
from ..activations import activate

__all__ = ["ACTIVATIONS", "activate", "conv_transpose2d"]


def conv_transpose2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0,
                     output_padding=0, groups: int = 1, dilation=1, *, activation: Optional[str] = None,
                     out: Optional[Tensor] = None) -> Tensor:
    """``activation(F.conv_transpose2d(...))``, written into ``out`` when given (and then returned)."""
    y = activate(F.conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups, dilation),
                 activation)
    if out is None:
        return y
    return out.copy_(y)
