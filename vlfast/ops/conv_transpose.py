"""Transposed convolution + bias + activation (+ a write into a preallocated buffer) as torch custom ops.

``torch.ops.vlfast.conv_transpose2d`` is functional and differentiable; ``torch.ops.vlfast.conv_transpose2d_out``
writes into ``out`` (declared mutated, so ``torch.compile`` handles it) and is for inference. Both take
the backend as their last argument. The spec is :mod:`vlfast.reference.conv_transpose`; the Triton
kernels are in ``kernels/conv_transpose.py``, their launchers in ``conv_transpose_triton.py``.

The backward applies the activation's gradient with aten, then runs ``aten.convolution_backward``
(``transposed=True``), or, for a backend string "triton+triton" (``backend="triton"`` asked for by name,
dilation 1), the Triton dgrad and wgrad GEMMs of ``conv_transpose_triton.conv_transpose2d_backward``.
"""

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from ..reference import conv_transpose as ref
from ._common import ACT_CODE, ACT_NAME, memory_format, plain_tensor

OP = "conv_transpose2d"
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
    return FWD[_directions(backend)[0]](input, weight, bias, stride, padding, output_padding, groups, dilation,
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
    INTO[_directions(backend)[0]](out, input, weight, bias, stride, padding, output_padding, groups, dilation,
                                  activation)


@conv_transpose2d_out_op.register_fake
def _(input, weight, bias, stride, padding, output_padding, groups, dilation, activation, backend, out):
    return None


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, output_padding, groups, dilation, activation, backend = inputs
    ctx.save_for_backward(x, weight, bias, output if activation == ACT_CODE["relu"] else None)
    ctx.args = (stride, padding, output_padding, groups, dilation, activation, backend)


def _backward(ctx, grad, forward=None):
    """Gradients for (x, weight, bias): the activation's by aten, then aten.convolution_backward or the
    Triton backward (see the module docstring).
    ``forward`` recomputes the pre-activation output for silu/gelu (default: the custom op)."""
    x, weight, bias, y = ctx.saved_tensors
    stride, padding, output_padding, groups, dilation, activation, backend = ctx.args
    act = ACT_NAME[activation]
    if act == "relu":
        grad = _aten.threshold_backward(grad, y, 0)
    elif act is not None:  # recompute the pre-activation output
        z = (forward or conv_transpose2d_op)(x, weight, bias, stride, padding, output_padding, groups, dilation, 0,
                                             backend)
        grad = _aten.silu_backward(grad, z) if act == "silu" else _aten.gelu_backward(grad, z)
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
    if _directions(backend)[1] == "triton":
        from .conv_transpose_triton import conv_transpose2d_backward
        gx, gw = conv_transpose2d_backward(grad, x, weight, stride, padding, groups, (mask[0], mask[1]))
        gb = grad.sum((0, 2, 3), dtype=torch.float32).to(bias.dtype) if mask[2] else None
    else:
        gx, gw, gb = _aten.convolution_backward(grad, x, weight, None if bias is None else list(bias.shape), stride,
                                                padding, dilation, True, output_padding, groups, mask)
    return gx, gw, gb if mask[2] else None, None, None, None, None, None, None, None


def _directions(backend: str) -> tuple[str, str]:
    """(forward, backward) of an op backend string: "triton" runs the forward on Triton and the backward
    on PyTorch's gradient ops (cuDNN); "triton+triton" runs both on Triton."""
    fwd, _, bwd = backend.partition("+")
    return fwd, bwd or "reference"


conv_transpose2d_op.register_autograd(_backward, setup_context=_setup_context)


class _ConvTranspose2dFunction(torch.autograd.Function):
    """The same forward and backward as the custom op, for eager training: it skips the custom op's
    Python dispatch layers (``torch.library`` dispatch and autograd wrappers), host time that a
    forward + backward at U-Net sizes pays on every call. ``torch.compile`` traces the custom op."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, output_padding, groups, dilation, activation, backend):
        y = FWD[_directions(backend)[0]](x, weight, bias, stride, padding, output_padding, groups, dilation,
                                         activation)
        _setup_context(ctx, (x, weight, bias, stride, padding, output_padding, groups, dilation, activation,
                             backend), y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return _backward(ctx, grad, forward=lambda *args: FWD[_directions(args[-1])[0]](*args[:-1]))


# ---------------------------------------------------------------- the Python entry
def _pair(v, name: str, low: int) -> list[int]:
    """int or a sequence of 1 or 2 ints -> [a, b], each >= low."""
    if type(v) is int and v >= low:  # the common case, kept cheap
        return [v, v]
    if type(v) is tuple and len(v) == 2 and type(v[0]) is int and type(v[1]) is int and min(v) >= low:
        return list(v)
    if isinstance(v, (list, tuple, torch.Size)) and len(v) in (1, 2):
        vals = list(v) * (2 // len(v))
    else:
        vals = [v, v]
    if any(isinstance(x, bool) or not isinstance(x, int) for x in vals):
        raise TypeError(f"{name} must be an int or a tuple of 2 ints, got {v!r}")
    if any(x < low for x in vals):
        what = "positive" if low == 1 else "non-negative"
        raise ValueError(f"{name} must be {what}, got {v!r}")
    return vals


def _check_tensor(name: str, t, x: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but input has {x.dtype}; they must be the same")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but input is on {x.device}")


_select_at_trace = torch.compiler.assume_constant_result(backends.select)


def _kernels_pay(x: Tensor, weight: Tensor, stride, padding, dilation, out: Optional[Tensor]) -> bool:
    """Whether the Triton kernels beat cuDNN on this input, so that ``auto`` picks them.

    Measured on an H100 (benchmarks/NOTES.md, 2026-11-26): the k = s GEMM kernel in 16-bit with a
    channels_last input or an ``out`` buffer ran 1.4-1.95x cuDNN; the phase kernel, fp32 (TF32 or not)
    and NCHW inputs ran at 0.3-1.3x, so those stay with cuDNN.
    """
    gemm = tuple(weight.shape[2:]) == tuple(stride) and not any(padding) and all(d == 1 for d in dilation)
    channels_last = memory_format(x) == torch.channels_last
    return gemm and x.dtype in (torch.float16, torch.bfloat16) and (channels_last or out is not None)


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
    if plain_tensor(input) and not torch.compiler.is_compiling():
        # Inference in eager at a geometry seen before: skip the checks and the planning (they passed for
        # the same metadata), most of the host time of a call.
        try:
            key = _geometry(input, weight, bias, stride, padding, output_padding, groups, dilation, activation, out,
                            backend)
            hit = None if key is None else _PLANS.get(key)
        except TypeError:  # an unhashable argument: the checked path says what is wrong with it
            hit = None
        if hit is not None and not (torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad or (
                bias is not None and bias.requires_grad))):
            backends._last[OP] = hit[0]
            return hit[1](input, weight, bias, out)
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got {input.dtype}")
    if input.dim() not in (3, 4):
        raise ValueError(f"input must be 3-D (Cin, H, W) or 4-D (N, Cin, H, W), got shape {tuple(input.shape)}")
    _check_tensor("weight", weight, input)
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (in_channels, out_channels/groups, kH, kW), got shape "
                         f"{tuple(weight.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    cin = input.shape[-3]
    if weight.shape[0] != cin:
        raise ValueError(f"weight of shape {tuple(weight.shape)} expects in_channels={weight.shape[0]}, but input "
                         f"has {cin} channels")
    if cin % groups:
        raise ValueError(f"in_channels={cin} must be divisible by groups={groups}")
    cout = weight.shape[1] * groups
    if bias is not None:
        _check_tensor("bias", bias, input)
        if tuple(bias.shape) != (cout,):
            raise ValueError(f"bias must have shape ({cout},) (out_channels), got {tuple(bias.shape)}")
    stride_arg, padding_arg, output_padding_arg, dilation_arg = stride, padding, output_padding, dilation
    stride = _pair(stride, "stride", 1)
    padding = _pair(padding, "padding", 0)
    dilation = _pair(dilation, "dilation", 1)
    output_padding = _pair(output_padding, "output_padding", 0)
    if any(op >= max(s, d) for op, s, d in zip(output_padding, stride, dilation)):
        raise ValueError(f"output_padding must be smaller than either stride or dilation, got output_padding="
                         f"{output_padding}, stride={stride}, dilation={dilation}")
    if not (activation is None or isinstance(activation, str)) or activation not in ACT_CODE:
        raise ValueError(f"activation must be one of {tuple(ACT_CODE)}, got {activation!r}")
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    shape = output_shape(x.shape, weight.shape, stride, padding, output_padding, groups, dilation)
    if min(shape[2:]) <= 0:
        raise ValueError(f"the output size {tuple(shape[2:])} is too small for input size {tuple(x.shape[2:])}, "
                         f"stride {stride}, padding {padding}, dilation {dilation}, kernel {tuple(weight.shape[2:])}")
    dst = None
    if out is not None:
        _check_tensor("out", out, input)
        want = shape[1:] if unbatched else shape
        if list(out.shape) != want:
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(want)}")
        dst = out.unsqueeze(0) if unbatched else out

    compiling = torch.compiler.is_compiling()
    name = (_select_at_trace if compiling else backends.select)(
        OP, x.device, x.dtype, backend, kernels_pay=_kernels_pay(x, weight, stride, padding, dilation, dst))
    args = (x, weight, bias, stride, padding, output_padding, groups, dilation, ACT_CODE[activation])
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    asked = backend if compiling else backend or backends.requested()
    if needs_grad and name == "triton" and dilation == [1, 1] and asked == "triton":
        # Triton asked for by name: the backward on its kernels too. Under auto the backward stays with
        # PyTorch's gradient ops until the Triton ones are measured faster (benchmarks/NOTES.md).
        name = "triton+triton"
    if dst is not None:
        if needs_grad:  # differentiable: the functional op, then a copy autograd tracks
            dst.copy_(conv_transpose2d_op(*args, name) if compiling else _ConvTranspose2dFunction.apply(*args, name))
            return out
        if compiling:
            conv_transpose2d_out_op(*args, name, dst)
            return out
    elif compiling or needs_grad:
        # Traced, or eager training (the same forward and backward without the dispatcher's Python layers).
        y = conv_transpose2d_op(*args, name) if compiling else _ConvTranspose2dFunction.apply(*args, name)
        return y.squeeze(0) if unbatched else y
    # Eager inference: plan, remember the plan for this geometry, run it.
    run = _plan(name, x, weight, bias, args[3:], dst, unbatched, shape)
    try:
        key = _geometry(input, weight, bias, stride_arg, padding_arg, output_padding_arg, groups, dilation_arg,
                        activation, out, backend)
    except TypeError:
        key = None
    if key is not None:
        if len(_PLANS) >= 256:
            _PLANS.clear()
        _PLANS[key] = (name, run)
    return run(input, weight, bias, out)


# (name, run) per call geometry of eager inference: see _geometry and _plan.
_PLANS: dict = {}


def _meta(t) -> tuple:
    return t.shape, t.stride(), t.dtype, t.device


def _geometry(x, weight, bias, stride, padding, output_padding, groups, dilation, activation, out, backend):
    """Everything the op's checks, its backend choice and its launch plan depend on, as a dict key (None
    where a tensor argument is not a plain tensor: such calls take the checked path)."""
    if not plain_tensor(weight) or not (bias is None or plain_tensor(bias)) or not (out is None or plain_tensor(out)):
        return None
    return (_meta(x), _meta(weight), bias if bias is None else _meta(bias), out if out is None else _meta(out),
            stride, padding, output_padding, type(groups), groups, dilation, activation, backend,
            backends.requested(), id(backends.PRIORITY.get(x.device.type)))


def _plan(name, x, weight, bias, geometry, dst, unbatched, shape):
    """run(input, weight, bias, out) -> the op's result, for tensors like these, on backend ``name``
    (input and out as the caller passes them: unbatched ones get their batch dimension here)."""
    stride, padding, output_padding, groups, dilation, activation = geometry
    fmt = memory_format(x)
    if name == "triton":
        from .conv_transpose_triton import plan_into
        # The plan needs the output's strides only: a meta tensor, nothing allocated.
        target = dst if dst is not None else torch.empty(shape, dtype=x.dtype, device="meta", memory_format=fmt)
        launch = plan_into(target, x, weight, bias, stride, padding, output_padding, groups, dilation, activation)

        def into(dst, x, weight, bias):
            return launch(dst, x, weight, bias)
    else:
        def into(dst, x, weight, bias):
            return INTO[name](dst, x, weight, bias, *geometry)

    def run(input, weight, bias, out):
        x = input.unsqueeze(0) if unbatched else input
        if out is not None:
            into(out.unsqueeze(0) if unbatched else out, x, weight, bias)
            return out
        if name != "triton":
            y = FWD[name](x, weight, bias, *geometry)
        else:
            y = into(torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt), x, weight, bias)
        return y.squeeze(0) if unbatched else y
    return run
