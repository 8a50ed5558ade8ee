"""What every fused block uses: whether a part is a plain layer, and the fused calls."""

import contextlib
from typing import Optional

import torch
from torch import Tensor, nn

from ..nn import _FUSIBLE, Conv2d, GroupNorm, _hooked
from ..ops.conv2d import conv2d
from ..ops.conv_transpose import conv_transpose2d
from ..ops.group_norm import group_norm

# Folds a 3x3 tap row onto the 4 taps of a stride-2 transposed convolution (padding 1): output row 2i
# reads input rows i (taps 1 + 2 of the 3x3 kernel) and i - 1 (tap 0); row 2i + 1 reads rows i (taps 0 + 1)
# and i + 1 (tap 2). Row k of this matrix is the transposed kernel's tap k.
_FOLD = ((0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0))


def plain_norm(m) -> bool:
    """A torch or vlfast GroupNorm without an activation of its own, hooks or parametrization."""
    return type(m) in (nn.GroupNorm, GroupNorm) and getattr(m, "activation", None) is None and not _hooked(m)


def plain_conv(m) -> bool:
    """A torch or vlfast Conv2d without an activation, hooks, parametrization or a non-zero padding mode."""
    return (type(m) in (nn.Conv2d, Conv2d) and getattr(m, "activation", None) is None and not _hooked(m)
            and m.padding_mode == "zeros" and not isinstance(m.padding, str))


def activation_name(m) -> Optional[str]:
    """The fused kernels' name of the activation module ``m`` (nn.SiLU, nn.ReLU, exact nn.GELU), else None."""
    if type(m) not in _FUSIBLE or getattr(m, "approximate", "none") != "none" or _hooked(m):
        return None
    return _FUSIBLE[type(m)]


def norm_act(x: Tensor, norm: nn.GroupNorm, activation: Optional[str], *, add: Optional[Tensor] = None,
             scale: Optional[Tensor] = None, shift: Optional[Tensor] = None) -> Tensor:
    """``act(norm(x + add) * (1 + scale) + shift)`` in one kernel; add, scale, shift: (N, C)."""
    return group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, add=add, scale=scale, shift=shift,
                      activation=activation)


def conv_residual(x: Tensor, conv: nn.Conv2d, residual: Tensor) -> Tensor:
    """``residual + conv(x)``, the add in the convolution's epilogue where ``conv`` is a plain layer."""
    if not plain_conv(conv):
        return residual + conv(x)
    return conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups,
                  residual=residual)


def upsample_conv_weight(weight: Tensor) -> Tensor:
    """The (Cin, Cout, 4, 4) weight of the stride-2, padding-1 transposed convolution equal to nearest 2x
    upsampling followed by the 3x3, padding-1 convolution of ``weight`` (Cout, Cin, 3, 3).

    Each of the four output phases is a 2x2 convolution of the input whose taps are sums of the 3x3 taps
    that land on the same input pixel. Computed in float32 (at least) and returned in ``weight``'s dtype;
    differentiable, and recomputed at every call so that writes to ``weight`` are seen."""
    fold = torch.tensor(_FOLD, dtype=torch.promote_types(weight.dtype, torch.float32), device=weight.device)
    with without_autocast(weight):  # the sums in float32; the convolution casts once
        return torch.einsum("ka,oiab,lb->iokl", fold, weight.to(fold.dtype), fold).to(weight.dtype)


def without_autocast(t: Tensor):
    """A context in which ops on ``t``'s device run in the dtypes they are given (autocast off where it is on):
    for a weight folded in float32 before the op that autocast casts."""
    device_type = t.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def upsample_conv(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``conv(F.interpolate(x, scale_factor=2, mode="nearest"))`` for a 3x3, padding-1 ``conv``, as one
    transposed convolution (:func:`upsample_conv_weight`)."""
    return conv_transpose2d(x, upsample_conv_weight(conv.weight), conv.bias, stride=2, padding=1)


def upsamples_as_one_conv(conv) -> bool:
    """Whether :func:`upsample_conv` can stand for ``conv`` after a nearest 2x upsampling."""
    return (plain_conv(conv) and tuple(conv.kernel_size) == (3, 3) and tuple(conv.stride) == (1, 1)
            and tuple(conv.padding) == (1, 1) and tuple(conv.dilation) == (1, 1) and conv.groups == 1)
