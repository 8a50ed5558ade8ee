"""GroupNorm + time-embedding add + scale-shift + activation as torch custom ops, with autograd.

``torch.ops.vlfast.group_norm_fwd`` returns ``(out, mean, rstd)``; its autograd formula calls
``torch.ops.vlfast.group_norm_bwd``. Both take the backend as their last argument: one name, or
"forward+backward" (e.g. "triton+cuda") where ``auto`` picked each direction apart. The formula is
in :mod:`vlfast.reference.group_norm`; the Triton kernels in ``kernels/group_norm.py``, the CUDA
kernels in ``csrc/cuda/group_norm_kernels.cuh``, the CPU forward in ``csrc/cpu/group_norm.h``.
Eager calls that need gradients go through ``_GroupNormFunction`` (same kernels, fewer Python layers).
"""

import math
from typing import Optional

import torch
from torch import Tensor

from .. import backends
from ..reference import group_norm as ref
from ._common import ACT_CODE, ACT_NAME, memory_format, plain_tensor

OP = "group_norm"
_GRAD_NAMES = ("input", "weight", "bias", "add", "scale", "shift")


# ---------------------------------------------------------------- backends
def _fwd_reference(x, num_groups, weight, bias, eps, add, scale, shift, activation):
    """Reference forward, plus the statistics the backward needs."""
    out = ref.group_norm(x, num_groups, weight, bias, eps, add=add, scale=scale, shift=shift,
                         activation=ACT_NAME[activation])
    n, c = x.shape[:2]
    if x.numel() == 0:
        stats = x.new_empty((n, num_groups), dtype=torch.float32)
        return out, stats, torch.empty_like(stats)
    h = x.float()
    if add is not None:
        h = h + add.float().reshape(add.shape + (1,) * (x.dim() - 2))
    var, mean = torch.var_mean(h.reshape(n, num_groups, (c // num_groups) * math.prod(x.shape[2:])), dim=-1,
                               correction=0)
    return out, mean, torch.rsqrt(var + eps)


def _bwd_reference(dy, x, num_groups, weight, bias, eps, add, scale, shift, activation, mean, rstd, needs):
    """The written-out gradients of the reference (statistics recomputed in fp32; mean, rstd unused)."""
    return ref.group_norm_backward(dy, x, num_groups, weight, bias, eps, add, scale, shift, ACT_NAME[activation],
                                   needs)


def _fwd_triton(x, num_groups, weight, bias, eps, add, scale, shift, activation):
    from .group_norm_triton import group_norm_fwd
    with backends.device_guard(x):
        return group_norm_fwd(x, num_groups, weight, bias, eps, add, scale, shift, ACT_NAME[activation])


def _bwd_triton(dy, x, num_groups, weight, bias, eps, add, scale, shift, activation, mean, rstd, needs):
    from .group_norm_triton import group_norm_bwd
    with backends.device_guard(x):
        return group_norm_bwd(dy, x, num_groups, weight, bias, add, scale, shift, ACT_NAME[activation], mean,
                              rstd, tuple(needs))


def _fwd_extension(x, num_groups, weight, bias, eps, add, scale, shift, activation):
    """The extension's kernel: csrc/cpu/group_norm.cpp on CPU tensors, csrc/cuda/group_norm.cu on CUDA ones."""
    return torch.ops.vlfast.group_norm_fwd_kernel(x, num_groups, weight, bias, eps, add, scale, shift, activation)


def _bwd_cuda(dy, x, num_groups, weight, bias, eps, add, scale, shift, activation, mean, rstd, needs):
    grads = torch.ops.vlfast.group_norm_bwd_kernel(dy, x, num_groups, weight, bias, add, scale, shift, activation,
                                                   mean, rstd, [bool(n) for n in needs])
    return tuple(g if need else None for g, need in zip(grads, needs))


FWD = {"reference": _fwd_reference, "triton": _fwd_triton, "cuda": _fwd_extension, "cpp": _fwd_extension}
# The CPU backward is the reference's (allowed by the design: the CPU forward is for inference).
BWD = {"reference": _bwd_reference, "triton": _bwd_triton, "cuda": _bwd_cuda, "cpp": _bwd_reference}


def _pair(backend: str) -> tuple[str, str]:
    """(forward, backward) backends of a backend argument: "triton" or, chosen by auto, "triton+cuda"."""
    fwd, _, bwd = backend.partition("+")
    return fwd, bwd or fwd


# ---------------------------------------------------------------- custom ops
@torch.library.custom_op("vlfast::group_norm_fwd", mutates_args=())
def group_norm_fwd(input: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                   add: Optional[Tensor], scale: Optional[Tensor], shift: Optional[Tensor], activation: int,
                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Fused forward; returns (out like input, mean (N, G) fp32, rstd (N, G) fp32)."""
    out, mean, rstd = FWD[_pair(backend)[0]](input, num_groups, weight, bias, eps, add, scale, shift, activation)
    return out, mean.float(), rstd.float()


@group_norm_fwd.register_fake
def _(input, num_groups, weight, bias, eps, add, scale, shift, activation, backend):
    stats = input.new_empty((input.shape[0], num_groups), dtype=torch.float32)
    return torch.empty_like(input), stats, torch.empty_like(stats)


@torch.library.custom_op("vlfast::group_norm_bwd", mutates_args=())
def group_norm_bwd(grad_out: Tensor, input: Tensor, num_groups: int, weight: Optional[Tensor],
                   bias: Optional[Tensor], eps: float, add: Optional[Tensor], scale: Optional[Tensor],
                   shift: Optional[Tensor], activation: int, mean: Tensor, rstd: Tensor, needs: list[bool],
                   backend: str) -> list[Tensor]:
    """Gradients for (input, weight, bias, add, scale, shift); an empty (0,) tensor where not needed."""
    grads = BWD[backend](grad_out, input, num_groups, weight, bias, eps, add, scale, shift, activation, mean,
                         rstd, needs)
    return [g if g is not None else input.new_empty((0,)) for g in grads]


@group_norm_bwd.register_fake
def _(grad_out, input, num_groups, weight, bias, eps, add, scale, shift, activation, mean, rstd, needs, backend):
    inputs = (input, weight, bias, add, scale, shift)
    return [torch.empty_like(t) if (t is not None and need) else input.new_empty((0,))
            for t, need in zip(inputs, needs)]


def _setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, eps, add, scale, shift, activation, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, add, scale, shift, mean, rstd)
    ctx.args = (num_groups, eps, activation, backend)


def _input_grads(ctx, grad_out, bwd):
    """The gradients of group_norm_fwd's ten inputs, by ``bwd`` (group_norm_bwd's signature)."""
    x, weight, bias, add, scale, shift, mean, rstd = ctx.saved_tensors
    num_groups, eps, activation, backend = ctx.args
    if grad_out is None:  # only mean or rstd was used: they carry no gradient
        grad_out = torch.zeros_like(x)
    needs = [ctx.needs_input_grad[i] for i in (0, 2, 3, 5, 6, 7)]
    grads = bwd(grad_out.contiguous(memory_format=memory_format(x)), x, num_groups, weight, bias, eps, add, scale,
                shift, activation, mean, rstd, needs, _pair(backend)[1])
    g = [t if need else None for t, need in zip(grads, needs)]
    return g[0], None, g[1], g[2], None, g[3], g[4], g[5], None, None


def _backward(ctx, grad_out, grad_mean, grad_rstd):
    return _input_grads(ctx, grad_out, group_norm_bwd)


group_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


class _GroupNormFunction(torch.autograd.Function):
    """The same forward and backward as the custom op, for eager training: it skips the custom op's
    Python dispatch layers, which cost more host time than the kernels take at U-Net sizes
    (H100, 2026-11-26: about 1 ms per forward + backward through the custom op)."""

    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps, add, scale, shift, activation, backend, forward):
        """``forward(x, weight, bias, eps, add, scale, shift) -> (out, mean, rstd)``: the op's planned forward."""
        out, mean, rstd = forward(x, weight, bias, eps, add, scale, shift)
        _setup_context(ctx, (x, num_groups, weight, bias, eps, add, scale, shift, activation, backend),
                       (out, mean, rstd))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        return _input_grads(ctx, grad_out, lambda *args: BWD[args[-1]](*args[:-1])) + (None,)


# ---------------------------------------------------------------- the Python entry
def _check_param(name: str, t, shape: tuple, x: Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor or None, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but input is on {x.device}")


_select_at_trace = torch.compiler.assume_constant_result(backends.select)


def _prefer(x: Tensor, num_groups: int) -> Optional[tuple[str, ...]]:
    """The forward's order under ``auto`` where it is not the per-op default. H100 (benchmarks/NOTES.md,
    2026-11-26): where the Triton forward takes its split path (three launches: 8x512x32², 4x128x256²)
    the CUDA forward was faster per call at five of those six bf16 rows (1.1-4.0x)."""
    if x.is_cuda and x.numel():
        from .group_norm_triton import takes_split_path
        if takes_split_path(x, num_groups):
            return ("cuda", "triton", "reference")
    return None


def group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, *, add: Optional[Tensor] = None, scale: Optional[Tensor] = None,
               shift: Optional[Tensor] = None, activation: Optional[str] = None,
               backend: Optional[str] = None) -> Tensor:
    """GroupNorm fused with the time-embedding add, scale-shift and an activation, in one pass.

    input: (N, C, *) float32/float16/bfloat16 (float64 runs the reference), NCHW or channels_last;
    weight, bias: (C,); add, scale, shift: (N, C); activation: None, "silu", "relu" or "gelu".
    Returns a tensor like ``input`` (same dtype and memory format). Differentiable in input,
    weight, bias, add, scale and shift. Equivalent PyTorch::

        h = input + add[:, :, None, None]
        y = F.group_norm(h, num_groups, weight, bias, eps) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        out = F.silu(y)   # activation="silu"
    """
    compiling = torch.compiler.is_compiling()
    if not compiling and plain_tensor(input):
        # Eager, at a geometry seen before: skip the checks and the planning (they passed for the same
        # metadata), the largest part of a small call's host time.
        key = _geometry(input, num_groups, weight, bias, add, scale, shift, activation, backend)
        if key is not None:
            grad = torch.is_grad_enabled() and (input.requires_grad or any(
                t is not None and t.requires_grad for t in (weight, bias, add, scale, shift)))
            try:
                hit = _PLANS.get((key, grad))
            except TypeError:  # an unhashable argument: the checked path says what is wrong with it
                hit = None
            if hit is not None:
                backends._last.update(hit[0])
                return hit[1](input, weight, bias, float(eps), add, scale, shift)
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got {input.dtype}")
    if input.dim() < 2:
        raise ValueError(f"input must have shape (N, C, *), got {tuple(input.shape)}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    n, c = input.shape[:2]
    if c % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the number of channels C={c}")
    if not (activation is None or isinstance(activation, str)) or activation not in ACT_CODE:
        raise ValueError(f"activation must be one of {tuple(ACT_CODE)}, got {activation!r}")
    for name, t in (("weight", weight), ("bias", bias)):
        _check_param(name, t, (c,), input)
    for name, t in (("add", add), ("scale", scale), ("shift", shift)):
        _check_param(name, t, (n, c), input)
    given = input
    if memory_format(input) == torch.contiguous_format and not input.is_contiguous():
        input = input.contiguous()
    select = _select_at_trace if compiling else backends.select
    name = select(OP, input.device, input.dtype, backend, prefer=_prefer(input, num_groups))
    args = (input, num_groups, weight, bias, float(eps), add, scale, shift, ACT_CODE[activation])
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, weight, bias, add, scale, shift))
    last = {OP: name}
    if compiling or needs_grad:
        # The backward picks its own backend (under auto the fastest backward may be another's).
        bwd = select("group_norm_bwd", input.device, input.dtype, backend)
        last["group_norm_bwd"] = bwd
        name = name if bwd == name else f"{name}+{bwd}"
    if compiling:
        return group_norm_fwd(*args, name)[0]
    copy, act = input is not given, ACT_CODE[activation]
    forward = _plan(_pair(name)[0], input, num_groups, weight, bias, add, scale, shift, act)
    if needs_grad:
        # In eager, skip the custom op's Python layers: they cost more than the kernels.
        def run(x, weight, bias, eps, add, scale, shift):
            return _GroupNormFunction.apply(x.contiguous() if copy else x, num_groups, weight, bias, eps, add,
                                            scale, shift, act, name, forward)
    else:
        def run(x, weight, bias, eps, add, scale, shift):
            return forward(x.contiguous() if copy else x, weight, bias, eps, add, scale, shift)[0]
    key = _geometry(given, num_groups, weight, bias, add, scale, shift, activation, backend)
    if plain_tensor(given) and key is not None:
        if len(_PLANS) >= 256:
            _PLANS.clear()
        _PLANS[(key, needs_grad)] = (last, run)
    return run(given, weight, bias, float(eps), add, scale, shift)


# ({op: backend} to report, run) per call geometry and need of gradients, in eager: see _geometry and _plan.
_PLANS: dict = {}


def _geometry(x, num_groups, weight, bias, add, scale, shift, activation, backend) -> Optional[tuple]:
    """Everything the op's checks, its backend choice and its launch plan depend on, as a dict key (None
    where an argument is not a plain tensor: such calls take the checked path)."""
    params = []
    for t in (weight, bias, add, scale, shift):
        if t is None:
            params.append(None)
        elif plain_tensor(t):
            params.append((t.shape, t.stride(), t.dtype, t.device))
        else:
            return None
    return (x.shape, x.stride(), x.dtype, x.device, type(num_groups), num_groups, activation, backend,
            backends.requested(), id(backends.OP_PRIORITY.get(OP)), id(backends.OP_PRIORITY.get("group_norm_bwd")),
            id(backends.PRIORITY.get(x.device.type)), *params)


def _plan(name, x, num_groups, weight, bias, add, scale, shift, activation):
    """forward(x, weight, bias, eps, add, scale, shift) -> (out, mean, rstd) on backend ``name`` for tensors
    like these (x as the kernels take it): for Triton, everything worked out from the metadata is done
    here once (``plan_fwd``), so that a call only allocates and launches."""
    if name == "triton":
        from .group_norm_triton import plan_fwd
        with backends.device_guard(x):
            launch = plan_fwd(x, num_groups, weight, bias, add, scale, shift, ACT_NAME[activation])

        def forward_triton(x, weight, bias, eps, add, scale, shift):
            with backends.device_guard(x):
                return launch(x, weight, bias, eps, add, scale, shift)
        return forward_triton

    def forward(x, weight, bias, eps, add, scale, shift):
        return FWD[name](x, num_groups, weight, bias, eps, add, scale, shift, activation)
    return forward
