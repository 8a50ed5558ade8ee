"""GroupNorm with the diffusion time-embedding add, scale-shift and activation, as plain PyTorch.

The spec every backend follows (forward and backward), for input of shape (N, C, *) and
per-(sample, channel) ``add``, ``scale``, ``shift`` of shape (N, C):

    h    = input + add[:, :, None, ...]                    # if add is given
    y    = F.group_norm(h, num_groups, weight, bias, eps)  # statistics in fp32
    y    = y * (1 + scale[:, :, None, ...]) + shift[...]   # if scale / shift are given
    out  = activation(y)                                   # None, "silu", "relu" or "gelu" (erf)

Ho et al.'s ResBlock is ``add`` + SiLU ("ddpm"); ADM's AdaGN is scale-shift + SiLU ("adm").
"""

import math

import torch

# The activations and their reference functions live in vlfast/activations.py (the one table of names and
# codes); these names stay importable from here.
from ..activations import NAMES as ACTIVATIONS
from ..activations import activate, activation_grad
from ..ops._common import format_strides, suggest_memory_format


def _per_channel(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(N, C) -> (N, C, 1, ...) broadcastable against an input of ``dim`` dimensions."""
    return t.reshape(t.shape + (1,) * (dim - 2))


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, *, add=None, scale=None, shift=None,
               activation=None, compute_dtype=torch.float32):
    """Reference forward; differentiable with autograd. Computes in ``compute_dtype`` (at least fp32),
    returns ``input``'s dtype, and the memory format and strides F.group_norm gives its output."""
    dtype = input.dtype
    if input.numel() == 0:
        return torch.empty_like(input, memory_format=suggest_memory_format(input))
    ct = torch.promote_types(compute_dtype, dtype)
    h = input.to(ct)
    if add is not None:
        h = h + _per_channel(add.to(ct), input.dim())
    # F.group_norm written out, so that a group of one element (G = C at 1x1) normalises to 0, not an error.
    n, c = input.shape[:2]
    groups = h.reshape(n, num_groups, (c // num_groups) * math.prod(input.shape[2:]))
    var, mean = torch.var_mean(groups, dim=-1, correction=0, keepdim=True)
    y = ((groups - mean) * torch.rsqrt(var + eps)).reshape(input.shape)
    if weight is not None:
        y = y * weight.to(ct).reshape((c,) + (1,) * (input.dim() - 2))
    if bias is not None:
        y = y + bias.to(ct).reshape((c,) + (1,) * (input.dim() - 2))
    if scale is not None:
        y = y * (1 + _per_channel(scale.to(ct), input.dim()))
    if shift is not None:
        y = y + _per_channel(shift.to(ct), input.dim())
    out = activate(y, activation).to(dtype)
    # The layout of F.group_norm's output: dense in the input's suggested memory format, with its own strides
    # (not under torch.func transforms: vmap's tensors have no layout of their own, and refuse the clone).
    fmt = suggest_memory_format(input)
    if not torch._C._are_functorch_transforms_active() and out.stride() != format_strides(out.shape, fmt):
        out = out.clone(memory_format=fmt)
    return out


def group_norm_backward(grad_out, input, num_groups, weight, bias, eps, add, scale, shift, activation, needs):
    """Gradients of :func:`group_norm` for (input, weight, bias, add, scale, shift), written out.

    With xhat the normalised h, y0 = xhat * w + b, y1 = y0 * (1 + scale) + shift, out = act(y1):
    g1 = dy * act'(y1); dshift = sum_s g1; dscale = sum_s g1 * y0; g0 = g1 * (1 + scale);
    dw = sum_{n,s} g0 * xhat; db = sum_{n,s} g0; with dxhat = g0 * w,
    dh = rstd * (dxhat - mean_group(dxhat) - xhat * mean_group(dxhat * xhat)); dx = dh; dadd = sum_s dh.
    ``needs`` says which of the six are wanted; the others come back as None.
    """
    ct = torch.promote_types(torch.float32, input.dtype)
    n, c = input.shape[:2]
    g = num_groups
    h = input.to(ct).reshape(n, c, math.prod(input.shape[2:]))
    if add is not None:
        h = h + add.to(ct)[..., None]
    size = h.shape[-1]
    var, mean = torch.var_mean(h.reshape(n, g, (c // g) * size), dim=-1, correction=0, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    xhat = ((h.reshape(n, g, (c // g) * size) - mean) * rstd).reshape(n, c, size)
    w = weight.to(ct)[None, :, None] if weight is not None else torch.ones((), dtype=ct, device=input.device)
    y0 = xhat * w + (bias.to(ct)[None, :, None] if bias is not None else 0)
    gain = 1 + scale.to(ct)[..., None] if scale is not None else torch.ones((), dtype=ct, device=input.device)
    y1 = y0 * gain + (shift.to(ct)[..., None] if shift is not None else 0)
    g1 = grad_out.to(ct).reshape(n, c, size) * activation_grad(y1, activation)
    g0 = g1 * gain
    dxhat = (g0 * w).reshape(n, g, (c // g) * size)
    xg = xhat.reshape(n, g, (c // g) * size)
    dh = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xg * (dxhat * xg).mean(-1, keepdim=True))
    dh = dh.reshape(n, c, size)
    grads = {
        "input": lambda: torch.empty_like(input).copy_(dh.reshape(input.shape)),
        "weight": lambda: (g0 * xhat).sum((0, 2)).to(weight.dtype),
        "bias": lambda: g0.sum((0, 2)).to(bias.dtype),
        "add": lambda: dh.sum(-1).to(add.dtype),
        "scale": lambda: (g1 * y0).sum(-1).to(scale.dtype),
        "shift": lambda: g1.sum(-1).to(shift.dtype),
    }
    present = (input, weight, bias, add, scale, shift)
    return tuple(fn() if (need and t is not None) else None for (name, fn), t, need in zip(grads.items(), present, needs))
