"""``nn.Sequential`` with convolution + eval-mode BatchNorm (+ activation) as one convolution (see
:mod:`vlfast.blocks`).

In eval mode BatchNorm2d is a per-channel affine map of its input, ``y * s + (beta - mean * s)`` with
``s = gamma / sqrt(running_var + eps)``: folded into the convolution before it (weight times ``s``, bias
mapped the same way), the pair is one convolution, and a ReLU / SiLU / GELU after it runs in the
convolution's epilogue. The folded weight is computed at every call (reads of the live parameters and
running statistics), so training, ``.data`` writes and ``load_state_dict`` are seen. In training mode, or
where a part has hooks, each module runs as it is.

On CUDA tensors only: there the fold's few weight-sized kernels replace a pass over the activation (the
BatchNorm) and a second one (the activation); on the CPU, where oneDNN's convolution and BatchNorm are
cheap and each small op costs host time, folding at every call measured 2x slower on the small U-Net, so
the modules run as they are (the ``fold_batchnorm`` knob of ``vlfast.ops._overrides`` forces either way).
"""

from typing import Optional

import torch
from torch import Tensor, nn

from ..ops import _overrides
from ..ops.conv2d import conv2d
from ._common import _hooked, activation_name, plain_conv, without_autocast


def folds(bn) -> bool:
    """Whether ``bn`` is an exact BatchNorm2d that normalises with running statistics (eval mode) and has no
    hooks: an affine map a convolution before it can absorb."""
    return (type(bn) is nn.BatchNorm2d and not bn.training and bn.running_mean is not None
            and bn.running_var is not None and not _hooked(bn))


def has_conv_batchnorm(seq: nn.Sequential) -> bool:
    """Whether ``seq`` holds a Conv2d immediately followed by a BatchNorm2d (what :class:`Sequential` fuses)."""
    mods = list(seq._modules.values())
    return any(isinstance(a, nn.Conv2d) and type(b) is nn.BatchNorm2d for a, b in zip(mods, mods[1:]))


def folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """(weight, bias) of the convolution equal to ``bn(conv(x))`` with ``bn`` in eval mode; computed in
    float32 (at least), returned in the convolution weight's dtype; differentiable in every parameter."""
    ct = torch.promote_types(conv.weight.dtype, torch.float32)
    with without_autocast(conv.weight):
        scale = (bn.running_var.to(ct) + bn.eps).rsqrt_()
        if bn.weight is not None:
            scale = scale * bn.weight.to(ct)
        shift = conv.bias.to(ct) - bn.running_mean if conv.bias is not None else -bn.running_mean.to(ct)
        bias = torch.addcmul(bn.bias.to(ct), shift, scale) if bn.bias is not None else shift * scale
        weight = conv.weight.to(ct) * scale[:, None, None, None]
    return weight.to(conv.weight.dtype), bias.to(conv.weight.dtype)


def sequential_forward(seq: nn.Sequential, input: Tensor) -> Tensor:
    """``nn.Sequential.forward``, with each plain Conv2d -> eval-mode BatchNorm2d [-> activation] run as one
    convolution."""
    mods = list(seq._modules.values())
    fold = _overrides.get("fold_batchnorm")
    fold = input.is_cuda if fold is None else fold
    i = 0
    while i < len(mods):
        conv = mods[i]
        if fold and i + 1 < len(mods) and plain_conv(conv) and folds(mods[i + 1]):
            act: Optional[str] = activation_name(mods[i + 2]) if i + 2 < len(mods) else None
            weight, bias = folded(conv, mods[i + 1])
            input = conv2d(input, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups,
                           activation=act)
            i += 3 if act else 2
            continue
        input = conv(input)
        i += 1
    return input


class Sequential(nn.Sequential):
    """``nn.Sequential`` whose Conv2d -> BatchNorm2d [-> activation] runs as one convolution in eval mode."""

    def forward(self, input: Tensor) -> Tensor:
        return sequential_forward(self, input)
