"""Convolution (dilated or not) + bias + residual + activation (+ a write into a preallocated buffer) as torch
custom ops.

``torch.ops.vlfast.conv2d`` is functional and differentiable; ``torch.ops.vlfast.conv2d_out`` writes into
``out`` (declared mutated, so ``torch.compile`` handles it) and is for inference. Both take the backend as
their last argument and symmetric padding only: ``padding="same"`` with an even dilated kernel extent is
made symmetric by the entry, which pads the input's extra bottom row / right column with ``F.pad`` first,
as PyTorch's own convolution does. The spec is :mod:`vlfast.reference.conv2d`; the Triton launchers are in
``conv2d_triton.py``.

The backward applies the activation's gradient with aten (which is also the residual's gradient), then runs
``aten.convolution_backward`` on the backward backend "reference", or the Triton dgrad and wgrad of
``conv2d_triton.conv2d_backward`` on "triton". :data:`OP` declares the op to the shared dispatch layer
(``_dispatch.py``).
"""

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import tuning
from ..reference import conv2d as ref
from ..activations import CODE as ACT_CODE
from ..activations import NAME as ACT_NAME
from ..activations import activate
from ..activations import code as activation_code
from . import _dispatch
from ._common import (activation_backward, check_conv_operands, check_out, check_tensor, layout_class,
                      memory_format, pair, write_out)

_aten = torch.ops.aten


# ---------------------------------------------------------------- shapes and layouts
def output_shape(x_shape, w_shape, stride, padding, dilation) -> list[int]:
    """(N, Cout, OH, OW) of a batched input of shape x_shape (symmetric padding)."""
    n, _, h, w = x_shape
    cout, _, kh, kw = w_shape
    return [n, cout] + [(i + 2 * p - d * (k - 1) - 1) // s + 1 for i, s, p, d, k in
                        zip((h, w), stride, padding, dilation, (kh, kw))]


def symmetric_padding(padding, kernel_size, stride, dilation) -> tuple[list[int], Optional[list[int]]]:
    """(padding [h, w] on both sides, F.pad's argument for the extra bottom/right padding or None) of
    F.conv2d's ``padding``: an int, a pair, "valid" or "same" (the total d*(k-1) per axis, its odd
    remainder at the bottom/right: aten's ``_convolution_mode``)."""
    if isinstance(padding, str):
        if padding == "valid":
            return [0, 0], None
        if padding != "same":
            raise ValueError(f"padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}")
        if stride != [1, 1]:  # PyTorch's error, in its words
            raise RuntimeError("padding='same' is not supported for strided convolutions")
        total = [d * (int(k) - 1) for d, k in zip(dilation, kernel_size)]  # int: a traced size under jit.trace
        extra = [t % 2 for t in total]
        return [t // 2 for t in total], [0, extra[1], 0, extra[0]] if any(extra) else None
    return pair(padding, "padding", 0), None


# ---------------------------------------------------------------- backends
def _into_reference(out, x, weight, bias, residual, stride, padding, dilation, groups, activation):
    return ref.conv2d(x, weight, bias, stride, padding, dilation, groups, activation=ACT_NAME[activation],
                      residual=residual, out=out)


def _into_triton(out, x, weight, bias, residual, stride, padding, dilation, groups, activation):
    from .conv2d_triton import plan_into
    return plan_into(out, x, weight, bias, residual, stride, padding, dilation, groups, activation)(
        out, x, weight, bias, residual)


def _fwd_reference(x, weight, bias, residual, stride, padding, dilation, groups, activation):
    y = ref.conv2d(x, weight, bias, stride, padding, dilation, groups, activation=ACT_NAME[activation],
                   residual=residual)
    return y.contiguous(memory_format=memory_format(x))


def _fwd_triton(x, weight, bias, residual, stride, padding, dilation, groups, activation):
    out = torch.empty(output_shape(x.shape, weight.shape, stride, padding, dilation), dtype=x.dtype,
                      device=x.device, memory_format=memory_format(x))
    return _into_triton(out, x, weight, bias, residual, stride, padding, dilation, groups, activation)


FWD = {"reference": _fwd_reference, "triton": _fwd_triton}
INTO = {"reference": _into_reference, "triton": _into_triton}


# ---------------------------------------------------------------- custom ops
@torch.library.custom_op("vlfast::conv2d", mutates_args=())
def conv2d_op(input: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], stride: list[int],
              padding: list[int], dilation: list[int], groups: int, activation: int, backend: str) -> Tensor:
    """act(F.conv2d(...) + residual) for a 4-D input and symmetric padding; channels_last output for a
    channels_last input."""
    return FWD[OP.directions(backend)[0]](input, weight, bias, residual, stride, padding, dilation, groups,
                                        activation)


@conv2d_op.register_fake
def _(input, weight, bias, residual, stride, padding, dilation, groups, activation, backend):
    return torch.empty(output_shape(input.shape, weight.shape, stride, padding, dilation), dtype=input.dtype,
                       device=input.device, memory_format=memory_format(input))


@torch.library.custom_op("vlfast::conv2d_out", mutates_args=("out",))
def conv2d_out_op(input: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                  stride: list[int], padding: list[int], dilation: list[int], groups: int, activation: int,
                  backend: str, out: Tensor) -> None:
    """Writes act(F.conv2d(...) + residual) into ``out`` (any strides). Not differentiable."""
    INTO[OP.directions(backend)[0]](out, input, weight, bias, residual, stride, padding, dilation, groups,
                                  activation)


@conv2d_out_op.register_fake
def _(input, weight, bias, residual, stride, padding, dilation, groups, activation, backend, out):
    return None


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, stride, padding, dilation, groups, activation, backend = inputs
    ctx.save_for_backward(x, weight, bias, residual, output if activation == ACT_CODE["relu"] else None)
    ctx.args = (stride, padding, dilation, groups, activation, backend)


def _backward(ctx, grad):
    """Gradients for (x, weight, bias, residual): the activation's by aten (the residual's gradient), then
    the backward backend's (see the module docstring). silu/gelu recompute the pre-activation output."""
    x, weight, bias, residual, y = ctx.saved_tensors
    stride, padding, dilation, groups, activation, backend = ctx.args
    fwd, bwd = OP.directions(backend)
    args = (x, weight, bias, residual, stride, padding, dilation, groups, 0)  # without the activation
    grad = activation_backward(grad, ACT_NAME[activation], y, lambda: FWD[fwd](*args) if getattr(ctx, "eager", False)
                               else conv2d_op(*args, fwd))
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
    if bwd == "triton":
        from .conv2d_triton import conv2d_backward
        gx, gw = conv2d_backward(grad, x, weight, stride, padding, dilation, groups, (mask[0], mask[1]))
        gb = grad.sum((0, 2, 3), dtype=torch.float32).to(bias.dtype) if mask[2] else None
    else:
        gx, gw, gb = _aten.convolution_backward(grad, x, weight, None if bias is None else list(bias.shape), stride,
                                                padding, dilation, False, [0, 0], groups, mask)
    gr = grad if residual is not None and ctx.needs_input_grad[3] else None
    return gx, gw, gb if mask[2] else None, gr, None, None, None, None, None, None


_Function = _dispatch.autograd(conv2d_op, _setup_context, _backward, _fwd_reference)


# ---------------------------------------------------------------- the declaration
class Inputs(NamedTuple):
    """A checked call: x (batched, with the extra "same" padding applied), residual and dst (``out``)
    batched; the geometry as lists, padding symmetric; the activation's code."""
    x: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    residual: Optional[Tensor]
    stride: list
    padding: list
    dilation: list
    groups: int
    activation: int
    dst: Optional[Tensor]
    unbatched: bool
    pad: Optional[list]  # F.pad's argument for the extra bottom/right padding of "same", or None
    shape: list  # (N, Cout, OH, OW)
    device: torch.device
    dtype: torch.dtype

    def conv_args(self) -> tuple:
        """The custom ops' arguments from input to activation."""
        return (self.x, self.weight, self.bias, self.residual, self.stride, self.padding, self.dilation,
                self.groups, self.activation)


class Conv2d(_dispatch.Op):
    name = "conv2d"
    forward_backends = tuple(FWD)
    backward_backends = ("reference", "triton")  # see _backward
    # aten's conv2d: the autocast dtype; a residual already in it (one of another dtype takes the entry's
    # unfused path, whose add promotes as PyTorch's does).
    autocast_policy = {"cuda": "lower", "cpu": "lower"}
    autocast_args = (0, 1, 2, 8)  # input, weight, bias, residual (not out: its dtype is the caller's)
    eager_is_reference = True  # the reference backend runs the aten calls eager users run

    def check(self, input, weight, bias, stride, padding, dilation, groups, activation, residual, out) -> Inputs:
        check_conv_operands(input, weight, groups, "conv2d", "out_channels, in_channels/groups, kH, kW")
        cin, cout = input.shape[-3], weight.shape[0]
        if cin % groups:
            raise ValueError(f"in_channels={cin} must be divisible by groups={groups}")
        if weight.shape[1] * groups != cin:
            raise ValueError(f"weight of shape {tuple(weight.shape)} with groups={groups} expects in_channels="
                             f"{weight.shape[1] * groups}, but input has {cin} channels")
        if cout % groups:
            raise ValueError(f"out_channels={cout} (weight's first dim) must be divisible by groups={groups}")
        check_tensor("bias", bias, input, shape=(cout,))
        stride = pair(stride, "stride", 1)
        dilation = pair(dilation, "dilation", 1)
        padding, pad = symmetric_padding(padding, weight.shape[2:], stride, dilation)
        unbatched = input.dim() == 3
        x = input.unsqueeze(0) if unbatched else input
        if pad is not None:
            x = F.pad(x, pad)
        shape = output_shape(x.shape, weight.shape, stride, padding, dilation)
        if min(shape[2:]) <= 0:
            raise ValueError(f"the output size {tuple(shape[2:])} is too small (non-positive) for input size "
                             f"{tuple(x.shape[2:])}, stride {stride}, padding {padding}, dilation {dilation}, "
                             f"kernel {tuple(weight.shape[2:])}")
        check_tensor("residual", residual, input, shape=shape[1:] if unbatched else shape)
        if residual is not None and unbatched:
            residual = residual.unsqueeze(0)
        dst = check_out(out, input, shape, unbatched)
        return Inputs(x, weight, bias, residual, stride, padding, dilation, groups, activation_code(activation),
                      dst, unbatched, pad, shape, x.device, x.dtype)

    def reference(self, input, weight, bias, stride, padding, dilation, groups, activation, residual, out):
        return ref.conv2d(input, weight, bias, stride, padding, dilation, groups, activation=activation,
                          residual=residual, out=out)

    def limits(self, backend: str, direction: str, inputs: Inputs) -> list[str]:
        """The Triton kernels index one sample (and the weight) with int32 and the batch's rows of pixels
        with int32; the implicit-GEMM forward and the backward put the groups on a grid axis of at most
        65535 (the depthwise forward does not)."""
        if backend != "triton":
            return []
        i, reasons = inputs, []
        n, cin, h, w = i.x.shape
        per_sample = max(cin * h * w, math.prod(i.shape[1:]), i.weight.numel())
        if per_sample >= 2**31:
            reasons.append(f"one sample (or the weight) has {per_sample} elements; the Triton kernels index it "
                           "with int32")
        rows = n * max(h * w, i.shape[2] * i.shape[3])
        if rows >= 2**31:
            reasons.append(f"the batch has {rows} rows of pixels; the Triton kernels index them with int32 "
                           "(split the batch)")
        if i.groups > 65535 and (direction == "backward" or i.weight.shape[1] != 1):
            reasons.append(f"groups={i.groups}: the Triton kernels take at most 65535 (a grid axis)")
        return reasons

    def tuning_fields(self, inputs: Inputs) -> tuple[str, ...]:
        """Layout, kind (dense, grouped, depthwise), kernel and stride, dilation, channels per group in and
        out, output pixels of the batch, and the epilogue's writes (out=, residual or plain)."""
        i, (cout, cin_g, kh, kw) = inputs, inputs.weight.shape
        kind = "dense" if i.groups == 1 else "depthwise" if cin_g == 1 else "grouped"
        return (layout_class(i.x), kind, f"k{kh}x{kw}s{i.stride[0]}x{i.stride[1]}",
                tuning.channel_class(max(i.dilation), "d"), tuning.channel_class(cin_g, "cin"),
                tuning.channel_class(cout // i.groups, "cout"),
                tuning.size_class(i.shape[0] * i.shape[2] * i.shape[3], "px"),
                "out" if i.dst is not None else "res" if i.residual is not None else "plain")

    def rule(self, direction: str, inputs: Inputs) -> Optional[tuple[str, ...]]:
        """On CUDA, the Triton forward only where :func:`_triton_pays`; the backward on the reference
        (aten's convolution_backward: cuDNN). On the CPU the device's default (the reference: oneDNN)."""
        if inputs.device.type != "cuda":
            return None
        return ("triton", "reference") if direction == "forward" and _triton_pays(inputs) else ("reference",)

    def plan(self, inputs: Inputs, choice: _dispatch.Choice, grad: bool):
        unbatched, pad, backend = inputs.unbatched, inputs.pad, choice.op_arg()
        into = _planned_into(choice.forward, inputs)
        forward = _planned_forward(choice.forward, inputs, into)

        def batched(input, residual):  # the custom ops' x and residual
            x = input.unsqueeze(0) if unbatched else input
            if pad is not None:
                x = F.pad(x, pad)
            return x, residual.unsqueeze(0) if unbatched and residual is not None else residual

        if grad:
            geometry = inputs.conv_args()[4:]

            def forward_op(x, weight, bias, residual, *rest):  # the custom op's signature, for _Function
                return forward(x, weight, bias, residual)

            def run_grad(input, weight, bias, stride, padding, dilation, groups, activation, residual, out):
                x, r = batched(input, residual)
                y = _Function.apply(x, weight, bias, r, *geometry, backend, forward_op)
                y = y.squeeze(0) if unbatched else y
                return y if out is None else out.copy_(y)  # differentiable: a copy autograd tracks
            return run_grad

        def run(input, weight, bias, stride, padding, dilation, groups, activation, residual, out):
            x, r = batched(input, residual)
            if out is not None:
                write_out(out, into, out.unsqueeze(0) if unbatched else out, x, weight, bias, r)
                return out
            y = forward(x, weight, bias, r)
            return y.squeeze(0) if unbatched else y
        return run

    def trace(self, inputs: Inputs, choice: _dispatch.Choice):
        args, backend = inputs.conv_args(), choice.op_arg()
        grad = _dispatch.grad_recorded((inputs.x, inputs.weight, inputs.bias, inputs.residual))
        if inputs.dst is not None and not grad:
            conv2d_out_op(*args, backend, inputs.dst)
            return inputs.dst.squeeze(0) if inputs.unbatched else inputs.dst
        y = conv2d_op(*args, backend)
        if inputs.dst is not None:
            inputs.dst.copy_(y)
            return inputs.dst.squeeze(0) if inputs.unbatched else inputs.dst
        return y.squeeze(0) if inputs.unbatched else y


OP = Conv2d()


def _triton_pays(i: Inputs) -> bool:
    """Whether the Triton forward should beat cuDNN on inputs like these. Unmeasured: the prediction in
    benchmarks/NOTES.md ("Dilated convolution", v1) has it 1.3-2x cuDNN on the context module's dilated
    64-channel layers in 16-bit, and 0.75-1.0x on the 256-channel ones, so: dilation > 1 (cuDNN's dilated
    kernels are its slow ones), fp16/bf16, at most 128 input channels per group, with a channels_last
    input, an ``out`` buffer or a residual (fusions cuDNN does not make). Everything else stays on cuDNN
    until measured."""
    if i.dilation == [1, 1] or i.dtype not in (torch.float16, torch.bfloat16):
        return False
    if i.weight.shape[1] > 128:
        return False
    return memory_format(i.x) == torch.channels_last or i.dst is not None or i.residual is not None


def _planned_into(name: str, inputs: Inputs):
    """into(dst, x, weight, bias, residual) -> dst on backend ``name`` for tensors like these (batched,
    padded); for Triton the launch is planned here once (``plan_into`` reads the output's strides only,
    from a meta tensor where no ``out`` is given, and takes care of outputs sharing memory with an input)."""
    geometry = inputs.conv_args()[4:]
    if name == "triton":
        from .conv2d_triton import plan_into
        i = inputs
        target = i.dst if i.dst is not None else torch.empty(i.shape, dtype=i.dtype, device="meta",
                                                             memory_format=memory_format(i.x))
        return plan_into(target, i.x, i.weight, i.bias, i.residual, *geometry)
    if name == "reference":  # computes the result, then copies it into dst: right even where they overlap
        return lambda dst, x, weight, bias, residual: _into_reference(dst, x, weight, bias, residual, *geometry)
    raise AssertionError(name)


def _planned_forward(name: str, inputs: Inputs, into):
    """forward(x, weight, bias, residual) -> y on backend ``name`` for tensors like these (batched, padded):
    the reference's own, or ``into`` (a plan of :func:`_planned_into` for the same inputs) on a fresh output."""
    geometry = inputs.conv_args()[4:]
    if name == "reference":
        return lambda x, weight, bias, residual: _fwd_reference(x, weight, bias, residual, *geometry)
    if inputs.dst is not None:  # into was planned for out's strides; the fresh output has its own
        into = _planned_into(name, inputs._replace(dst=None))
    shape, fmt = inputs.shape, memory_format(inputs.x)
    return lambda x, weight, bias, residual: into(
        torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt), x, weight, bias, residual)


# ---------------------------------------------------------------- the Python entry
def conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1,
           groups: int = 1, *, activation: Optional[str] = None, residual: Optional[Tensor] = None,
           out: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """2-D convolution (dilated or not) with the bias, a residual add, an activation and the output write
    fused in.

    input: (N, Cin, H, W) or unbatched (Cin, H, W), float32/float16/bfloat16 (float64 runs the
    reference), NCHW or channels_last (no layout copy); weight: (Cout, Cin/groups, KH, KW); bias:
    (Cout,); stride, dilation: an int or a pair; padding: an int, a pair, "same" (stride 1; an even
    dilated kernel extent pads its extra row/column at the bottom/right, as PyTorch) or "valid";
    activation: None, "relu", "silu" or "gelu" (erf); residual: a tensor of the output's shape, added
    before the activation. ``out``: a tensor of the output's shape and dtype with any strides (e.g.
    ``buf[:, :Cout]``, a channel slice of a U-Net concat buffer) written in place and returned. Without
    ``out`` the result is channels_last for a channels_last input, else contiguous. Differentiable in
    input, weight, bias and residual (backward by PyTorch's convolution_backward; by Triton kernels with
    ``backend="triton"``). Equivalent::

        y = F.conv2d(input, weight, bias, stride, padding, dilation, groups)
        y = y + residual     # residual= given
        y = F.silu(y)        # activation="silu"
        out.copy_(y)         # out= given
    """
    if residual is not None and _promotes_under_autocast(input, residual):
        # PyTorch's conv gives the autocast dtype and its separate add promotes to the residual's: the same,
        # unfused, so that the result has PyTorch's dtype.
        y = activate(OP(input, weight, bias, stride, padding, dilation, groups, None, None, None, backend=backend)
                     + residual, activation)
        return y if out is None else out.copy_(y)
    return OP(input, weight, bias, stride, padding, dilation, groups, activation, residual, out, backend=backend)


def _promotes_under_autocast(input, residual) -> bool:
    """Whether, under autocast, ``conv(input) + residual`` is wider than the autocast dtype in PyTorch."""
    if not (isinstance(input, Tensor) and isinstance(residual, Tensor)):
        return False
    device_type = input.device.type
    return (torch.is_autocast_enabled(device_type) and residual.is_floating_point()
            and residual.dtype != torch.get_autocast_dtype(device_type))
