"""GroupNorm + time-embedding add + scale-shift + activation as torch custom ops, with autograd.

``torch.ops.vlfast.group_norm_fwd`` returns ``(out, mean, rstd)``; its autograd formula calls
``torch.ops.vlfast.group_norm_bwd``; ``torch.ops.vlfast.group_norm_fwd_out`` writes the forward into ``out``
(declared mutated, so ``torch.compile`` handles it; for inference). They take the backend as their last
argument (before ``out``): one name, or "forward+backward" (e.g. "triton+cuda"). The formula is in
:mod:`vlfast.reference.group_norm`; the Triton kernels in ``kernels/group_norm.py`` (launchers:
``group_norm_triton.py``), the CUDA kernels in ``csrc/cuda/group_norm_kernels.cuh``, the CPU forward in
``csrc/cpu/group_norm.h``. :data:`OP` declares the op to the shared dispatch layer (``_dispatch.py``);
eager training runs the same forward and backward through :data:`_Function` (fewer Python layers than
the custom op).
"""

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import backends, tuning
from ..reference import group_norm as ref
from ..activations import NAME as ACT_NAME
from ..activations import activation_grad
from ..activations import code as activation_code
from . import _dispatch
from ._common import (aten_layout, aten_layout_plan, check_out, check_tensor, is_same_tensor, layout_class,
                      memory_format, shares_memory, suggest_memory_format, write_out)


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


def _bwd_cpp(dy, x, num_groups, weight, bias, eps, add, scale, shift, activation, mean, rstd, needs):
    """The reference's gradients on the CPU through aten's vectorised GroupNorm kernels, in float32 (float64
    for float64), three passes fewer than the written-out formulas: y0 = xhat * w + b by aten's forward, g1 =
    dy * act'(y0 * (1 + scale) + shift), g0 = g1 * (1 + scale), then dx, dw, db by aten's backward of g0."""
    ct = torch.promote_types(torch.float32, x.dtype)
    n, c = x.shape[:2]
    hw = math.prod(x.shape[2:])
    per_channel = (n, c) + (1,) * (x.dim() - 2)
    fmt = memory_format(x)  # aten's kernels take dense tensors
    h = x.to(ct) if add is None else x.to(ct) + add.to(ct).reshape(per_channel)
    h = h.contiguous(memory_format=fmt)
    w = weight.to(ct) if weight is not None else None
    y0, mean, rstd = torch.ops.aten.native_group_norm(h, w, bias.to(ct) if bias is not None else None, n, c, hw,
                                                      num_groups, eps)
    gain = 1 + scale.to(ct).reshape(per_channel) if scale is not None else None
    g1 = dy.to(ct).contiguous(memory_format=fmt)
    if ACT_NAME[activation] is not None:
        y1 = y0 if gain is None else y0 * gain
        y1 = y1 if shift is None else y1 + shift.to(ct).reshape(per_channel)
        g1 = g1 * activation_grad(y1, ACT_NAME[activation])
    g0 = g1 if gain is None else g1 * gain
    dx, dw, db = torch.ops.aten.native_group_norm_backward(
        g0, h, mean, rstd, w, n, c, hw, num_groups,
        [bool(needs[0] or needs[3]), bool(needs[1] and weight is not None), bool(needs[2] and bias is not None)])
    spatial = tuple(range(2, x.dim()))
    grads = (lambda: torch.empty_like(x).copy_(dx), lambda: dw.to(weight.dtype), lambda: db.to(bias.dtype),
             lambda: dx.sum(spatial).to(add.dtype), lambda: (g1 * y0).sum(spatial).to(scale.dtype),
             lambda: g1.sum(spatial).to(shift.dtype))
    present = (x, weight, bias, add, scale, shift)
    return tuple(fn() if (need and t is not None) else None for fn, t, need in zip(grads, present, needs))


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
    """The extension's kernel: csrc/cpu/group_norm.cpp on CPU tensors, csrc/cuda/group_norm.cu on CUDA ones.
    Its output has its input's strides: x is given those of F.group_norm's output first."""
    return torch.ops.vlfast.group_norm_fwd_kernel(aten_layout(x), num_groups, weight, bias, eps, add, scale, shift,
                                                  activation)


def _bwd_cuda(dy, x, num_groups, weight, bias, eps, add, scale, shift, activation, mean, rstd, needs):
    # x may have channels-last strides and not be dense: the kernel's layout first.
    grads = torch.ops.vlfast.group_norm_bwd_kernel(dy, aten_layout(x), num_groups, weight, bias, add, scale, shift,
                                                   activation, mean, rstd, [bool(n) for n in needs])
    return tuple(g if need else None for g, need in zip(grads, needs))


def _into_copy(forward):
    """The forward into ``out`` by a fresh output and a copy: right for any strides of out, and where out shares
    memory with an input (the result is complete before out is written)."""
    def into(out, x, num_groups, weight, bias, eps, add, scale, shift, activation):
        out.copy_(forward(x, num_groups, weight, bias, eps, add, scale, shift, activation)[0])
    return into


def _into_triton(out, x, num_groups, weight, bias, eps, add, scale, shift, activation):
    from .group_norm_triton import group_norm_fwd
    with backends.device_guard(x):
        group_norm_fwd(x, num_groups, weight, bias, eps, add, scale, shift, ACT_NAME[activation], out=out)


def _into_cpp(layout=aten_layout):
    """The forward into ``out`` on the CPU kernel, x given the strides of F.group_norm's output by ``layout``
    (:func:`aten_layout` or a plan of it). The kernel writes ``out`` itself where out has those strides and
    shares no memory with the inputs, or is x itself (in place: the kernel reads each group before it writes
    it); elsewhere it writes a fresh output, copied into out."""
    def into(out, x, num_groups, weight, bias, eps, add, scale, shift, activation):
        xk, params = layout(x), (weight, bias, add, scale, shift)
        direct = out.stride() == xk.stride() and not any(shares_memory(out, t) for t in params)
        if direct and (is_same_tensor(out, xk) or not shares_memory(out, xk)):
            torch.ops.vlfast.group_norm_fwd_out_kernel(xk, num_groups, weight, bias, eps, add, scale, shift,
                                                       activation, out)
        else:
            out.copy_(_fwd_extension(xk, num_groups, weight, bias, eps, add, scale, shift, activation)[0])
    return into


FWD = {"reference": _fwd_reference, "triton": _fwd_triton, "cuda": _fwd_extension, "cpp": _fwd_extension}
# The forward written into a given tensor: the CUDA kernel's glue allocates its output, so it is copied.
INTO = {"reference": _into_copy(_fwd_reference), "triton": _into_triton, "cuda": _into_copy(_fwd_extension),
        "cpp": _into_cpp()}
# The cpp backward is aten's CPU kernels around the fused extras (no vlfast._C kernel of its own).
BWD = {"reference": _bwd_reference, "triton": _bwd_triton, "cuda": _bwd_cuda, "cpp": _bwd_cpp}


# ---------------------------------------------------------------- custom ops
@torch.library.custom_op("vlfast::group_norm_fwd", mutates_args=())
def group_norm_fwd(input: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                   add: Optional[Tensor], scale: Optional[Tensor], shift: Optional[Tensor], activation: int,
                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Fused forward; returns (out like input, mean (N, G) fp32, rstd (N, G) fp32)."""
    out, mean, rstd = FWD[OP.directions(backend)[0]](input, num_groups, weight, bias, eps, add, scale, shift,
                                                     activation)
    return out, mean.float(), rstd.float()


@group_norm_fwd.register_fake
def _(input, num_groups, weight, bias, eps, add, scale, shift, activation, backend):
    stats = input.new_empty((input.shape[0], num_groups), dtype=torch.float32)
    out = torch.empty(input.shape, dtype=input.dtype, device=input.device,
                      memory_format=suggest_memory_format(input))  # F.group_norm's layout, as the kernels give
    return out, stats, torch.empty_like(stats)


@torch.library.custom_op("vlfast::group_norm_fwd_out", mutates_args=("out",))
def group_norm_fwd_out(input: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                       add: Optional[Tensor], scale: Optional[Tensor], shift: Optional[Tensor], activation: int,
                       backend: str, out: Tensor) -> None:
    """Writes the fused forward into ``out`` (input's shape and dtype, any strides). Not differentiable."""
    INTO[OP.directions(backend)[0]](out, input, num_groups, weight, bias, eps, add, scale, shift, activation)


@group_norm_fwd_out.register_fake
def _(input, num_groups, weight, bias, eps, add, scale, shift, activation, backend, out):
    return None


@torch.library.custom_op("vlfast::group_norm_bwd", mutates_args=())
def group_norm_bwd(grad_out: Tensor, input: Tensor, num_groups: int, weight: Optional[Tensor],
                   bias: Optional[Tensor], eps: float, add: Optional[Tensor], scale: Optional[Tensor],
                   shift: Optional[Tensor], activation: int, mean: Tensor, rstd: Tensor, needs: list[bool],
                   backend: str) -> list[Tensor]:
    """Gradients for (input, weight, bias, add, scale, shift) on the backward backend of ``backend``; an
    empty (0,) tensor where not needed."""
    grads = BWD[OP.directions(backend)[1]](grad_out, input, num_groups, weight, bias, eps, add, scale, shift,
                                           activation, mean, rstd, needs)
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


def _backward(ctx, grad_out, grad_mean, grad_rstd):
    """The gradients of group_norm_fwd's ten inputs (mean and rstd carry none)."""
    x, weight, bias, add, scale, shift, mean, rstd = ctx.saved_tensors
    num_groups, eps, activation, backend = ctx.args
    if grad_out is None:  # only mean or rstd was used
        grad_out = torch.zeros_like(x)
    needs = [ctx.needs_input_grad[i] for i in (0, 2, 3, 5, 6, 7)]
    args = (grad_out.contiguous(memory_format=memory_format(x)), x, num_groups, weight, bias, eps, add, scale, shift,
            activation, mean, rstd, needs)
    if getattr(ctx, "eager", False):
        grads = BWD[OP.directions(backend)[1]](*args)
    else:
        grads = group_norm_bwd(*args, backend)
    g = [t if need else None for t, need in zip(grads, needs)]
    return g[0], None, g[1], g[2], None, g[3], g[4], g[5], None, None


_Function = _dispatch.autograd(group_norm_fwd, _setup_context, _backward, _fwd_reference)


# ---------------------------------------------------------------- the declaration
class Inputs(NamedTuple):
    """A checked call: x as the kernels take it (dense: a strided input is copied), the activation's code, the
    ``out`` tensor (dst) or None."""
    x: Tensor
    num_groups: int
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    add: Optional[Tensor]
    scale: Optional[Tensor]
    shift: Optional[Tensor]
    eps: float
    activation: int
    copy: bool  # x is a contiguous copy of the entry's input
    dst: Optional[Tensor]
    device: torch.device
    dtype: torch.dtype

    def fwd_args(self) -> tuple:
        """The custom ops' arguments from input to activation."""
        return (self.x, self.num_groups, self.weight, self.bias, self.eps, self.add, self.scale, self.shift,
                self.activation)


class GroupNorm(_dispatch.Op):
    name = "group_norm"
    forward_backends = tuple(FWD)
    backward_backends = tuple(BWD)
    extension_ops = {"forward": ("group_norm_fwd_kernel",), "backward": {"cuda": ("group_norm_bwd_kernel",)}}
    values_only = frozenset({4})  # eps
    # aten's group_norm runs in float32 under CUDA autocast and untouched under CPU autocast (it takes
    # 16-bit inputs with float32 parameters as they are); the fused extras go with the input.
    autocast_policy = {"cuda": "fp32"}
    autocast_args = (0, 2, 3, 5, 6, 7)  # input, weight, bias, add, scale, shift
    eager_is_reference = True  # the reference backend runs the aten calls eager users run

    def check(self, input, num_groups, weight, bias, eps, add, scale, shift, activation, out=None) -> Inputs:
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
        for name, t in (("weight", weight), ("bias", bias)):
            check_tensor(name, t, input, shape=(c,), same_dtype=False)  # parameters may be of another dtype
        for name, t in (("add", add), ("scale", scale), ("shift", shift)):
            check_tensor(name, t, input, shape=(n, c), same_dtype=False)
        # The output takes F.group_norm's layout (suggest_memory_format: channels_last(_3d) or contiguous). An
        # input in neither layout is copied: to contiguous here (and on the planned path); one with
        # channels-last strides but not dense by the backends themselves, into channels_last.
        x = input
        if suggest_memory_format(input) == torch.contiguous_format and not input.is_contiguous():
            x = input.contiguous()
        dst = check_out(out, input, list(input.shape), False)
        return Inputs(x, num_groups, weight, bias, add, scale, shift, float(eps), activation_code(activation),
                      x is not input, dst, x.device, x.dtype)

    def reference(self, input, num_groups, weight, bias, eps, add, scale, shift, activation, out=None):
        y = ref.group_norm(input, num_groups, weight, bias, eps, add=add, scale=scale, shift=shift,
                           activation=activation)
        return y if out is None else out.copy_(y)

    def limits(self, backend: str, direction: str, inputs: Inputs) -> list[str]:
        per_sample = math.prod(inputs.x.shape[1:])
        if backend == "triton" and per_sample >= 2**31:
            return [f"one sample has {per_sample} elements; the Triton kernels index a sample with int32"]
        return []

    def tuning_fields(self, inputs: Inputs) -> tuple[str, ...]:
        """Layout, elements of the batch and elements of one group."""
        x = inputs.x
        per_group = x.numel() // max(x.shape[0] * inputs.num_groups, 1)
        return layout_class(x), tuning.size_class(x.numel(), "n"), tuning.size_class(per_group, "g")

    def rule(self, direction: str, inputs: Inputs) -> Optional[tuple[str, ...]]:
        """H100 (benchmarks/NOTES.md, 2026-11-26): the Triton forward beat the CUDA one at every measured
        shape replayed in a CUDA graph and at most of them per call, except where it takes its split path
        (three launches: 8x512x32², 4x128x256²), where the CUDA forward was faster at five of six bf16 rows
        (1.1-4.0x); the CUDA backward won everywhere."""
        if inputs.device.type != "cuda":
            return None
        if direction == "backward":
            return ("cuda", "triton", "reference")
        from .group_norm_triton import takes_split_path
        if inputs.x.numel() and takes_split_path(inputs.x, inputs.num_groups):
            return ("cuda", "triton", "reference")
        return ("triton", "cuda", "reference")

    def plan(self, inputs: Inputs, choice: _dispatch.Choice, grad: bool):
        forward = _planned_forward(choice.forward, inputs)
        copy, groups, act, backend = inputs.copy, inputs.num_groups, inputs.activation, choice.op_arg()
        if grad:
            def run_grad(input, num_groups, weight, bias, eps, add, scale, shift, activation, out):
                x = input.contiguous() if copy else input
                y = _Function.apply(x, groups, weight, bias, float(eps), add, scale, shift, act, backend, forward)[0]
                return y if out is None else out.copy_(y)  # differentiable: a copy autograd tracks
            return run_grad
        if inputs.dst is not None:
            into = _planned_into(choice.forward, inputs)

            def run_into(input, num_groups, weight, bias, eps, add, scale, shift, activation, out):
                x = input.contiguous() if copy else input
                write_out(out, into, out, x, groups, weight, bias, float(eps), add, scale, shift, act)
                return out
            return run_into

        def run(input, num_groups, weight, bias, eps, add, scale, shift, activation, out):
            x = input.contiguous() if copy else input
            return forward(x, groups, weight, bias, float(eps), add, scale, shift, act, backend)[0]
        return run

    def trace(self, inputs: Inputs, choice: _dispatch.Choice):
        i, backend = inputs, choice.op_arg()
        grad = _dispatch.grad_recorded((i.x, i.weight, i.bias, i.add, i.scale, i.shift))
        if i.dst is not None and not grad:
            group_norm_fwd_out(*i.fwd_args(), backend, i.dst)
            return i.dst
        y = group_norm_fwd(*i.fwd_args(), backend)[0]
        return y if i.dst is None else i.dst.copy_(y)


OP = GroupNorm()


def _planned_forward(name: str, inputs: Inputs):
    """forward(*group_norm_fwd's arguments) -> (out, mean, rstd) on backend ``name``, for tensors like these:
    for Triton, what the launcher works out from the metadata is done here once (``plan_fwd``)."""
    if name == "triton":
        from .group_norm_triton import plan_fwd
        i = inputs
        with backends.device_guard(i.x):
            launch = plan_fwd(i.x, i.num_groups, i.weight, i.bias, i.add, i.scale, i.shift, ACT_NAME[i.activation])

        def forward_triton(x, num_groups, weight, bias, eps, add, scale, shift, activation, backend, out=None):
            with backends.device_guard(x):
                return launch(x, weight, bias, eps, add, scale, shift, out)
        return forward_triton

    if name in ("cuda", "cpp"):  # the kernel's output has its input's strides: F.group_norm's, decided once
        layout = aten_layout_plan(inputs.x)

        def forward_extension(x, num_groups, weight, bias, eps, add, scale, shift, activation, backend):
            return torch.ops.vlfast.group_norm_fwd_kernel(layout(x), num_groups, weight, bias, eps, add, scale,
                                                          shift, activation)
        return forward_extension

    def forward(x, num_groups, weight, bias, eps, add, scale, shift, activation, backend):
        return FWD[name](x, num_groups, weight, bias, eps, add, scale, shift, activation)
    return forward


def _planned_into(name: str, inputs: Inputs):
    """into(out, *group_norm_fwd_out's arguments from input to activation) on backend ``name``, for tensors like
    these: the Triton launch and the CPU kernel's layout of x worked out here once (which of out's memory the
    inputs share is checked per call)."""
    if name == "triton":
        forward = _planned_forward(name, inputs)

        def into_triton(out, x, num_groups, weight, bias, eps, add, scale, shift, activation):
            forward(x, num_groups, weight, bias, eps, add, scale, shift, activation, name, out)
        return into_triton
    if name == "cpp":
        return _into_cpp(aten_layout_plan(inputs.x))
    return INTO[name]


# ---------------------------------------------------------------- the Python entry
def group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, *, add: Optional[Tensor] = None, scale: Optional[Tensor] = None,
               shift: Optional[Tensor] = None, activation: Optional[str] = None, out: Optional[Tensor] = None,
               backend: Optional[str] = None) -> Tensor:
    """GroupNorm fused with the time-embedding add, scale-shift and an activation, in one pass.

    input: (N, C, *) float32/float16/bfloat16 (float64 runs the reference), NCHW or channels_last;
    weight, bias: (C,); add, scale, shift: (N, C); activation: None, "silu", "relu" or "gelu".
    Returns a tensor like ``input`` (same dtype and memory format). ``out``: a tensor of input's shape
    and dtype with any strides, written in place and returned (its version bumped as PyTorch's out= ops
    do): a loop that reuses it allocates nothing, and on the CPU pays no first-touch page faults on a
    fresh output. The kernels write it directly where it has the returned tensor's strides (the cpp
    kernel also where it is ``input`` itself); other strides, or memory shared with an input, go
    through a temporary. Differentiable in input, weight, bias, add, scale and shift (with ``out``, by
    a copy autograd records). Equivalent PyTorch::

        h = input + add[:, :, None, None]
        y = F.group_norm(h, num_groups, weight, bias, eps) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        y = F.silu(y)     # activation="silu"
        out.copy_(y)      # out= given
    """
    return OP(input, num_groups, weight, bias, eps, add, scale, shift, activation, out, backend=backend)
