"""Transposed convolution + bias + activation (+ a write into a preallocated buffer) as torch custom ops.

``torch.ops.vlfast.conv_transpose2d`` is functional and differentiable; ``torch.ops.vlfast.conv_transpose2d_out``
writes into ``out`` (declared mutated, so ``torch.compile`` handles it) and is for inference. Both take
the backend as their last argument. The spec is :mod:`vlfast.reference.conv_transpose`; the Triton
kernels are in ``kernels/conv_transpose.py``, their launchers in ``conv_transpose_triton.py``.

The backward applies the activation's gradient with aten, then runs ``aten.convolution_backward``
(``transposed=True``) on the backward backend "reference", or the Triton dgrad and wgrad GEMMs of
``conv_transpose_triton.conv_transpose2d_backward`` on "triton" (dilation 1). :data:`OP` declares the op
to the shared dispatch layer (``_dispatch.py``).
"""

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import tuning
from ..reference import conv_transpose as ref
from ..activations import CODE as ACT_CODE
from ..activations import NAME as ACT_NAME
from ..activations import code as activation_code
from . import _dispatch, _overrides
from ._common import (activation_backward, check_conv_operands, check_out, check_tensor, layout_class,
                      memory_format, overlap_safe, pair, write_out)

_aten = torch.ops.aten


# ---------------------------------------------------------------- shapes and layouts
def output_shape(x_shape, w_shape, stride, padding, output_padding, groups, dilation) -> list[int]:
    """(N, Cout, OH, OW) of a batched input of shape x_shape."""
    n, _, h, w = x_shape
    _, cout_g, kh, kw = w_shape
    return [n, cout_g * groups] + [(i - 1) * s - 2 * p + d * (k - 1) + op + 1 for i, s, p, d, k, op in
                                   zip((h, w), stride, padding, dilation, (kh, kw), output_padding)]


# ---------------------------------------------------------------- backends
def _into_reference(out, x, weight, bias, stride, padding, output_padding, groups, dilation, activation):
    return ref.conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups, dilation,
                                activation=ACT_NAME[activation], out=out)


def _into_triton(out, x, weight, bias, stride, padding, output_padding, groups, dilation, activation):
    from .conv_transpose_triton import conv_transpose2d_into
    return conv_transpose2d_into(out, x, weight, bias, stride, padding, output_padding, groups, dilation, activation)


def _fwd_reference(x, weight, bias, stride, padding, output_padding, groups, dilation, activation):
    y = ref.conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups, dilation,
                             activation=ACT_NAME[activation])
    return y.contiguous(memory_format=memory_format(x))


def _fwd_triton(x, weight, bias, stride, padding, output_padding, groups, dilation, activation):
    out = torch.empty(output_shape(x.shape, weight.shape, stride, padding, output_padding, groups, dilation),
                      dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    return _into_triton(out, x, weight, bias, stride, padding, output_padding, groups, dilation, activation)


FWD = {"reference": _fwd_reference, "triton": _fwd_triton}
INTO = {"reference": _into_reference, "triton": _into_triton}


# ---------------------------------------------------------------- custom ops
@torch.library.custom_op("vlfast::conv_transpose2d", mutates_args=())
def conv_transpose2d_op(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int],
                        padding: list[int], output_padding: list[int], groups: int, dilation: list[int],
                        activation: int, backend: str) -> Tensor:
    """act(F.conv_transpose2d(...)) for a 4-D input; channels_last output for a channels_last input."""
    return FWD[OP.directions(backend)[0]](input, weight, bias, stride, padding, output_padding, groups, dilation,
                                        activation)


@conv_transpose2d_op.register_fake
def _(input, weight, bias, stride, padding, output_padding, groups, dilation, activation, backend):
    return torch.empty(output_shape(input.shape, weight.shape, stride, padding, output_padding, groups, dilation),
                       dtype=input.dtype, device=input.device, memory_format=memory_format(input))


@torch.library.custom_op("vlfast::conv_transpose2d_out", mutates_args=("out",))
def conv_transpose2d_out_op(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int],
                            padding: list[int], output_padding: list[int], groups: int, dilation: list[int],
                            activation: int, backend: str, out: Tensor) -> None:
    """Writes act(F.conv_transpose2d(...)) into ``out`` (any strides). Not differentiable."""
    INTO[OP.directions(backend)[0]](out, input, weight, bias, stride, padding, output_padding, groups, dilation,
                                  activation)


@conv_transpose2d_out_op.register_fake
def _(input, weight, bias, stride, padding, output_padding, groups, dilation, activation, backend, out):
    return None


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, output_padding, groups, dilation, activation, backend = inputs
    ctx.save_for_backward(x, weight, bias, output if activation == ACT_CODE["relu"] else None)
    ctx.args = (stride, padding, output_padding, groups, dilation, activation, backend)


def _backward(ctx, grad):
    """Gradients for (x, weight, bias): the activation's by aten, then the backward backend's GEMMs (see the
    module docstring). silu/gelu recompute the pre-activation output."""
    x, weight, bias, y = ctx.saved_tensors
    stride, padding, output_padding, groups, dilation, activation, backend = ctx.args
    fwd, bwd = OP.directions(backend)
    args = (x, weight, bias, stride, padding, output_padding, groups, dilation, 0)  # without the activation
    grad = activation_backward(grad, ACT_NAME[activation], y, lambda: FWD[fwd](*args) if getattr(ctx, "eager", False)
                               else conv_transpose2d_op(*args, fwd))
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
    if bwd == "triton":
        from .conv_transpose_triton import conv_transpose2d_backward
        gx, gw = conv_transpose2d_backward(grad, x, weight, stride, padding, groups, (mask[0], mask[1]))
        gb = grad.sum((0, 2, 3), dtype=torch.float32).to(bias.dtype) if mask[2] else None
    else:
        gx, gw, gb = _aten.convolution_backward(grad, x, weight, None if bias is None else list(bias.shape), stride,
                                                padding, dilation, True, output_padding, groups, mask)
    return gx, gw, gb if mask[2] else None, None, None, None, None, None, None, None


_Function = _dispatch.autograd(conv_transpose2d_op, _setup_context, _backward, _fwd_reference)


# ---------------------------------------------------------------- the declaration
class Inputs(NamedTuple):
    """A checked call: x and dst (``out``) batched; the geometry as lists; the activation's code."""
    x: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    stride: list
    padding: list
    output_padding: list
    groups: int
    dilation: list
    activation: int
    dst: Optional[Tensor]
    unbatched: bool
    shape: list  # (N, Cout, OH, OW)
    device: torch.device
    dtype: torch.dtype

    def conv_args(self) -> tuple:
        """The custom ops' arguments from input to activation."""
        return (self.x, self.weight, self.bias, self.stride, self.padding, self.output_padding, self.groups,
                self.dilation, self.activation)


class ConvTranspose2d(_dispatch.Op):
    name = "conv_transpose2d"
    forward_backends = tuple(FWD)
    backward_backends = ("reference", "triton")  # see _backward
    autocast_policy = {"cuda": "lower", "cpu": "lower"}  # aten's conv_transpose2d: the autocast dtype
    autocast_args = (0, 1, 2)  # input, weight, bias (not out: its dtype is the caller's)
    eager_is_reference = True  # the reference backend runs the aten calls eager users run

    def check(self, input, weight, bias, stride, padding, output_padding, groups, dilation, activation,
              out) -> Inputs:
        check_conv_operands(input, weight, groups, "conv_transpose2d", "in_channels, out_channels/groups, kH, kW")
        cin = input.shape[-3]
        if weight.shape[0] != cin:
            raise ValueError(f"weight of shape {tuple(weight.shape)} expects in_channels={weight.shape[0]}, but "
                             f"input has {cin} channels")
        if cin % groups:
            raise ValueError(f"in_channels={cin} must be divisible by groups={groups}")
        cout = weight.shape[1] * groups
        check_tensor("bias", bias, input, shape=(cout,))
        stride = pair(stride, "stride", 1)
        padding = pair(padding, "padding", 0)
        dilation = pair(dilation, "dilation", 1)
        output_padding = pair(output_padding, "output_padding", 0)
        if any(op >= max(s, d) for op, s, d in zip(output_padding, stride, dilation)):
            raise ValueError(f"output_padding must be smaller than either stride or dilation, got output_padding="
                             f"{output_padding}, stride={stride}, dilation={dilation}")
        unbatched = input.dim() == 3
        x = input.unsqueeze(0) if unbatched else input
        shape = output_shape(x.shape, weight.shape, stride, padding, output_padding, groups, dilation)
        if min(shape[2:]) <= 0:
            raise ValueError(f"the output size {tuple(shape[2:])} is too small for input size "
                             f"{tuple(x.shape[2:])}, stride {stride}, padding {padding}, dilation {dilation}, "
                             f"kernel {tuple(weight.shape[2:])}")
        dst = check_out(out, input, shape, unbatched)
        return Inputs(x, weight, bias, stride, padding, output_padding, groups, dilation, activation_code(activation),
                      dst, unbatched, shape, x.device, x.dtype)

    def reference(self, input, weight, bias, stride, padding, output_padding, groups, dilation, activation, out):
        return ref.conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups, dilation,
                                    activation=activation, out=out)

    def limits(self, backend: str, direction: str, inputs: Inputs) -> list[str]:
        """The Triton kernels index one sample (and the weight) with int32 and the batch's rows (output cells
        or pixels; input pixels in dgrad) with int32, and put the groups on a grid axis of at most 65535."""
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
        if i.groups > 65535:
            reasons.append(f"groups={i.groups}: the Triton kernels take at most 65535 (a grid axis)")
        if direction == "forward" and _overrides.get("conv_transpose_kernel") == "subpixel":
            from .conv_transpose_triton import subpixel_takes
            if not subpixel_takes(i.weight.shape[2:], i.stride, i.dilation):
                reasons.append(f"the sub-pixel kernel takes dilation 1 and kernel sizes that are multiples of the "
                               f"stride, got kernel {tuple(i.weight.shape[2:])}, stride {i.stride}, dilation "
                               f"{i.dilation}")
        if direction == "backward" and i.dilation != [1, 1]:
            reasons.append(f"the Triton backward takes dilation 1, got {i.dilation}")
        return reasons

    def tuning_fields(self, inputs: Inputs) -> tuple[str, ...]:
        """Layout, kind (dense or grouped), kernel and stride, the padding class ("p0": none, no output padding,
        no dilation), channels per group in and out, input pixels of the batch, and whether it writes out=."""
        i, (cin, cout_g, kh, kw) = inputs, inputs.weight.shape
        plain = not any(i.padding) and not any(i.output_padding) and i.dilation == [1, 1]
        return (layout_class(i.x), "dense" if i.groups == 1 else "grouped",
                f"k{kh}x{kw}s{i.stride[0]}x{i.stride[1]}", "p0" if plain else "pad",
                tuning.channel_class(cin // i.groups, "cin"), tuning.channel_class(cout_g, "cout"),
                tuning.size_class(i.x.shape[0] * i.x.shape[2] * i.x.shape[3], "px"),
                "out" if i.dst is not None else "plain")

    def rule(self, direction: str, inputs: Inputs) -> Optional[tuple[str, ...]]:
        """On CUDA, Triton only where :func:`_triton_pays`; the Triton backward is not yet measured against
        cuDNN's, so the reference (aten's convolution_backward) stays first."""
        if inputs.device.type != "cuda":
            return None
        return ("triton", "reference") if direction == "forward" and _triton_pays(inputs) else ("reference",)

    def plan(self, inputs: Inputs, choice: _dispatch.Choice, grad: bool):
        unbatched, backend = inputs.unbatched, choice.op_arg()
        into = _planned_into(choice.forward, inputs)
        forward = _planned_forward(choice.forward, inputs, into)
        if grad:
            geometry = inputs.conv_args()[3:]

            def forward_op(x, weight, bias, *rest):  # the custom op's signature, for _Function
                return forward(x, weight, bias)

            def run_grad(input, weight, bias, stride, padding, output_padding, groups, dilation, activation, out):
                x = input.unsqueeze(0) if unbatched else input
                y = _Function.apply(x, weight, bias, *geometry, backend, forward_op)
                y = y.squeeze(0) if unbatched else y
                return y if out is None else out.copy_(y)  # differentiable: a copy autograd tracks
            return run_grad

        def run(input, weight, bias, stride, padding, output_padding, groups, dilation, activation, out):
            x = input.unsqueeze(0) if unbatched else input
            if out is not None:
                write_out(out, into, out.unsqueeze(0) if unbatched else out, x, weight, bias)
                return out
            y = forward(x, weight, bias)
            return y.squeeze(0) if unbatched else y
        return run

    def trace(self, inputs: Inputs, choice: _dispatch.Choice):
        args, backend = inputs.conv_args(), choice.op_arg()
        grad = _dispatch.grad_recorded((inputs.x, inputs.weight, inputs.bias))
        if inputs.dst is not None and not grad:
            conv_transpose2d_out_op(*args, backend, inputs.dst)
            return inputs.dst.squeeze(0) if inputs.unbatched else inputs.dst
        y = conv_transpose2d_op(*args, backend)
        if inputs.dst is not None:
            inputs.dst.copy_(y)
            return inputs.dst.squeeze(0) if inputs.unbatched else inputs.dst
        return y.squeeze(0) if inputs.unbatched else y


OP = ConvTranspose2d()


def _triton_pays(i: Inputs) -> bool:
    """Whether the Triton forward beat cuDNN on inputs like these (H100, benchmarks/NOTES.md, 2026-11-26):
    the k = s GEMM kernel in 16-bit with a channels_last input or an ``out`` buffer ran 1.4-1.95x cuDNN;
    the phase kernel, fp32 (TF32 or not) and NCHW inputs ran at 0.3-1.3x."""
    gemm = list(i.weight.shape[2:]) == i.stride and not any(i.padding) and i.dilation == [1, 1]
    channels_last = memory_format(i.x) == torch.channels_last
    return gemm and i.dtype in (torch.float16, torch.bfloat16) and (channels_last or i.dst is not None)


def _planned_into(name: str, inputs: Inputs):
    """into(dst, x, weight, bias) -> dst on backend ``name`` for tensors like these (batched); for Triton the
    launch is planned here once (``plan_into``: it reads the output's strides only, from a meta tensor where
    no ``out`` is given; with an ``out``, right also where it shares memory with an input: ``overlap_safe``)."""
    geometry = inputs.conv_args()[3:]
    if name == "triton":
        from .conv_transpose_triton import plan_into
        i = inputs
        target = i.dst if i.dst is not None else torch.empty(i.shape, dtype=i.dtype, device="meta",
                                                             memory_format=memory_format(i.x))
        run = plan_into(target, i.x, i.weight, i.bias, *geometry)
        return run if i.dst is None else overlap_safe(run, i.dst, (i.x, i.weight, i.bias))
    if name == "reference":  # computes the result, then copies it into dst: right even where they overlap
        return lambda dst, x, weight, bias: _into_reference(dst, x, weight, bias, *geometry)
    raise AssertionError(name)


def _planned_forward(name: str, inputs: Inputs, into):
    """forward(x, weight, bias) -> y on backend ``name`` for tensors like these (batched): the reference's
    own, or ``into`` (a plan of :func:`_planned_into` for the same inputs) on a fresh output."""
    geometry = inputs.conv_args()[3:]
    if name == "reference":
        return lambda x, weight, bias: _fwd_reference(x, weight, bias, *geometry)
    if inputs.dst is not None:  # into was planned for out's strides; the fresh output has its own
        into = _planned_into(name, inputs._replace(dst=None))
    shape, fmt = inputs.shape, memory_format(inputs.x)
    return lambda x, weight, bias: into(torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt),
                                        x, weight, bias)


# ---------------------------------------------------------------- the Python entry
def conv_transpose2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0,
                     output_padding=0, groups: int = 1, dilation=1, *, activation: Optional[str] = None,
                     out: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """Transposed 2-D convolution with the bias, an activation and the output write fused in.

    input: (N, Cin, H, W) or unbatched (Cin, H, W), float32/float16/bfloat16 (float64 runs the
    reference), NCHW or channels_last (no layout copy); weight: (Cin, Cout/groups, KH, KW);
    bias: (Cout,); stride, padding, output_padding, dilation: an int or a pair; activation:
    None, "relu", "silu" or "gelu" (erf). ``out``: a tensor of the output's shape and dtype with any
    strides (e.g. ``buf[:, :Cout]``, a channel slice of a U-Net concat buffer) written in place and
    returned. Without ``out`` the result is channels_last for a channels_last input, else contiguous.
    Differentiable in input, weight and bias (backward by PyTorch's convolution_backward; by Triton
    kernels with ``backend="triton"`` at dilation 1). Equivalent::

        y = F.conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups, dilation)
        y = F.silu(y)        # activation="silu"
        out.copy_(y)         # out= given
    """
    return OP(input, weight, bias, stride, padding, output_padding, groups, dilation, activation, out,
              backend=backend)
