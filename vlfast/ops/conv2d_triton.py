"""Triton launchers of the fused (dilated, strided, grouped) convolution (kernels: vlfast/kernels/conv2d.py,
built on the implicit-GEMM core vlfast/kernels/igemm.py). The custom op, its autograd and the argument checks
live in vlfast/ops/conv2d.py; :func:`plan_into` is its Triton backend and :func:`conv2d_backward` its
Triton backward.

Kernels, chosen from the geometry (:func:`kernel_for`; ``plan_into(..., kernel=)`` forces one for tests and
probes):

- "depthwise" (Cin/G == 1: depthwise, Cout = G*multiplier, and single-channel inputs): a direct kernel, a
  [pixels, output channels] tile and a loop over the taps, no tl.dot (a GEMM tile would spend a whole K
  step on one channel);
- "igemm" (everything else): the core's implicit GEMM, rows = output pixels, columns = Cout/G. Where x is
  not channel-contiguous and a group has 16 or more channels, x is first made channels_last (one pass over
  x), so that the gathered input tiles have contiguous K rows, as the transposed convolution's phase
  kernel does.

Both kernels skip, per tile, the taps whose input rows or columns lie in the padding for every row of the
tile (the borders of a dilated convolution), and fuse bias, a residual added before the activation, the
activation, and a store through any output strides (a channel slice of a concat buffer). Tile rules, the
TF32 rule and the weight arrangements: vlfast/ops/igemm.py; the weight is re-arranged on every call, and
float32 on CUDA reads PyTorch's TF32 setting on every call.
"""

import math
from typing import Optional

import torch
from torch import Tensor

from .. import backends
from ._common import cdiv, overlap_safe, pow2
from .conv_transpose_triton import _channels_last_strides, conv_transpose2d_into
from .igemm import (backward_config, clamp_pow2, conv2d_config, conv2d_weight, depthwise_config, precision,
                    precision_rule, split_k)

__all__ = ["plan_into", "conv2d_into", "conv2d_backward", "kernel_for", "output_size"]


def kernel_for(cin_g: int) -> str:
    """"depthwise" for one input channel per group (depthwise convolutions, single-channel inputs), else "igemm"."""
    return "depthwise" if cin_g == 1 else "igemm"


def output_size(size: int, k: int, s: int, p: int, d: int) -> int:
    """F.conv2d's output size along one axis (symmetric padding p)."""
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def conv2d_into(out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], stride,
                padding, dilation, groups: int, activation: int) -> Tensor:
    """Write ``act(F.conv2d(x, weight, bias, stride, padding, dilation, groups) + residual)`` into ``out``
    and return it (:func:`plan_into`, then its ``run``)."""
    run = plan_into(out, x, weight, bias, residual, stride, padding, dilation, groups, activation)
    return run(out, x, weight, bias, residual)


def plan_into(out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], stride,
              padding, dilation, groups: int, activation: int, kernel: Optional[str] = None):
    """Plan ``out = act(F.conv2d(x, weight, bias, stride, padding, dilation, groups) + residual)`` from the
    tensors' metadata (kernel, tiles, layouts, grid, launch arguments) as ``run(out, x, weight, bias,
    residual) -> out``, valid for any tensors with the same shapes, strides, dtypes and device as these.

    x: (N, Cin, H, W); weight: (Cout, Cin/groups, KH, KW); bias: (Cout,) or None; residual and out:
    (N, Cout, OH, OW) (residual may be None); any strides (out e.g. a channel slice of a concat buffer); one
    dtype, float32/float16/bfloat16. stride, padding (symmetric), dilation: [h, w]; activation: 0 none,
    1 silu, 2 relu, 3 gelu (erf), applied after the residual add; float32 accumulation. ``run`` arranges the
    weight on every call and, for float32 on CUDA, reads PyTorch's TF32 setting. An ``out`` sharing memory
    with x, weight, bias or (other than being exactly the residual tensor) the residual is computed into a
    fresh tensor and copied. Arguments are assumed checked (vlfast.ops.conv2d does it). Equivalent::

        out.copy_(act(F.conv2d(x, weight, bias, stride, padding, dilation, groups) + residual))
    """
    from vlfast.kernels.conv2d import conv2d_depthwise_kernel, conv2d_igemm_kernel

    if x.dtype not in backends.KERNEL_DTYPES:
        raise TypeError(f"the Triton conv2d takes {backends.KERNEL_DTYPES}, got {x.dtype}")
    n, cin, h, w = x.shape
    cout, oh, ow = out.shape[1:]
    _, cin_g, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    kernel = kernel or kernel_for(cin_g)
    if kernel not in ("igemm", "depthwise") or (kernel == "depthwise" and cin_g != 1):
        raise ValueError(f"kernel must be 'igemm' or, for one input channel per group, 'depthwise'; got {kernel!r} "
                         f"with Cin/groups = {cin_g}")
    if out.numel() == 0:
        return lambda out, *rest: out
    if max(math.prod(x.shape[1:]), math.prod(out.shape[1:]), weight.numel(), n * oh * ow) >= 2**31:
        raise ValueError("one sample, the weight or the N*OH*OW output pixels hold 2**31 or more elements; the "
                         "kernels index them with int32")
    cout_g = cout // groups
    common = dict(HAS_BIAS=bias is not None, ACT=activation, RESIDUAL=residual is not None)
    bias_copy = bias is not None and bias.stride(0) != 1
    ints = (n, h, w, oh, ow)
    geometry = (kh, kw, sh, sw, ph, pw, dh, dw)
    res_strides = residual.stride() if residual is not None else out.stride()
    m = n * oh * ow

    def row_tiles(block_m: int, w_contiguous: bool):
        """(W_TILE, row tiles): 2-D blocks of W_TILE pixels along W where that dimension is contiguous in
        memory (see kernels/conv2d.py's ``_rows``), else 1-D tiles over all N*OH*OW pixels."""
        w_tile = min(pow2(ow), block_m) if w_contiguous else 0
        if w_tile:
            return w_tile, n * cdiv(oh, block_m // w_tile) * cdiv(ow, w_tile)
        return 0, cdiv(m, block_m)

    if kernel == "depthwise":
        cfg = depthwise_config(m, cout)
        # A W-contiguous output or input (NCHW): 2-D tiles, whose runs along W load and store as vectors.
        w_tile, tiles_m = row_tiles(cfg["BLOCK_M"], _w_contiguous(out) or _w_contiguous(x))
        launch = conv2d_depthwise_kernel[(tiles_m, cdiv(cout, cfg["BLOCK_C"]))]
        args = (*ints, cout, cout // cin, *geometry, *x.stride(), *res_strides, *out.stride())
        consts = dict(common, W_TILE=w_tile, **cfg)

        def launch_run(out, x, weight, bias, residual):
            with backends.device_guard(x):
                launch(x, conv2d_weight(weight, groups, "depthwise"), _bias(bias, weight, bias_copy),
                       out if residual is None else residual, out, *args, **consts)
            return out
    else:
        to_cl = x.stride(1) != 1 and cin_g >= 16  # see the module docstring
        xs = _channels_last_strides(x.shape) if to_cl else x.stride()
        cfg = conv2d_config(m, cout_g, cin_g, x.dtype)
        # A W-contiguous output (NCHW): 2-D tiles, so that the epilogue stores runs along W as vectors (with
        # 1-D tiles it scatters single elements, and spills at 128x128 tiles); a W-contiguous input with few
        # channels (read in place) also reads runs along W.
        w_tile, tiles_m = row_tiles(cfg["BLOCK_M"], _w_contiguous(out) or (not to_cl and _w_contiguous(x)))
        launch = conv2d_igemm_kernel[(tiles_m * cdiv(cout_g, cfg["BLOCK_N"]), groups)]
        args = (*ints, cin_g, cout_g, *geometry, *xs, *res_strides, *out.stride())
        consts = {p: dict(common, PRECISION=p, ONE_TAP=kh * kw == 1, W_TILE=w_tile, **cfg) for p in ("ieee", "tf32")}
        prec = precision_rule(x.dtype, x.device)

        def launch_run(out, x, weight, bias, residual):
            if to_cl:
                x = x.contiguous(memory_format=torch.channels_last)
            with backends.device_guard(x):
                launch(x, conv2d_weight(weight, groups, "taps"), _bias(bias, weight, bias_copy),
                       out if residual is None else residual, out, *args, **consts[prec()])
            return out
    return overlap_safe(launch_run, out, (x, weight, bias, residual), in_place=3)


def _w_contiguous(t: Tensor) -> bool:
    """Whether neighbouring pixels along W are neighbours in memory and channels are not (an NCHW-like layout)."""
    return t.stride(3) == 1 and t.stride(1) != 1


def _bias(bias: Optional[Tensor], weight: Tensor, copy: bool) -> Tensor:
    """The bias pointer argument: bias (contiguous), or any tensor where there is none."""
    return weight if bias is None else bias.contiguous() if copy else bias


def conv2d_backward(grad: Tensor, x: Tensor, weight: Tensor, stride, padding, dilation, groups: int,
                    needs: tuple[bool, bool]) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(dx, dweight) of ``F.conv2d(x, weight, None, stride, padding, dilation, groups)`` given ``grad`` of its
    output (N, Cout, OH, OW) (before any activation: the op applies the activation's gradient first); None
    where ``needs`` says no.

    dx is the transposed convolution of grad with the same weight, stride, padding, dilation and groups, sized
    to x (output_padding = the rows and columns the forward's stride left unread; conv_transpose_triton's
    kernels), with x's layout. dweight is a GEMM over the output pixels, split into float32 partials summed in
    a fixed order (deterministic), cast to weight's dtype, (Cout, Cin/G, KH, KW) contiguous. Any strides;
    float32/float16/bfloat16. Equivalent::

        dx, dw, _ = torch.ops.aten.convolution_backward(grad, x, weight, None, stride, padding, dilation, False,
                                                        (0, 0), groups, [True, True, False])
    """
    from vlfast.kernels.conv2d import conv2d_wgrad_kernel

    n, cin, h, w = x.shape
    _, _, oh, ow = grad.shape
    cout, cin_g, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw_) = stride, padding, dilation
    dx = dw = None
    if needs[0]:
        dx = torch.empty_like(x)
        # Transposed-convolution sizes are (OH - 1)*s - 2p + d*(k - 1) + 1 + output_padding: choose it to give H, W.
        out_pad = (h - ((oh - 1) * sh - 2 * ph + dh * (kh - 1) + 1), w - ((ow - 1) * sw - 2 * pw + dw_ * (kw - 1) + 1))
        conv_transpose2d_into(dx, grad, weight, None, stride, padding, out_pad, groups, dilation, 0)
    if needs[1]:
        cout_g = cout // groups
        rows, pixels = kh * kw * cin_g, n * oh * ow
        cfg = backward_config(rows, cout_g, pixels, x.dtype)
        cfg["BLOCK_M"] = clamp_pow2(rows, 16, cfg["BLOCK_M"])
        tiles = cdiv(rows, cfg["BLOCK_M"]) * cdiv(cout_g, cfg["BLOCK_N"]) * groups
        split, per_split = split_k(pixels, tiles, cfg["BLOCK_K"], x.device)
        part = torch.zeros((split, groups, rows, cout_g), dtype=torch.float32, device=x.device)
        if pixels and rows and cout_g:
            if max(math.prod(x.shape[1:]), math.prod(grad.shape[1:]), pixels) >= 2**31:
                raise ValueError("one sample or the N*OH*OW output pixels hold 2**31 or more elements; the "
                                 "kernels index them with int32")
            with backends.device_guard(x):
                conv2d_wgrad_kernel[(tiles // groups, split, groups)](
                    x, grad, part, n, h, w, oh, ow, cin_g, cout_g, kh, kw, sh, sw, ph, pw, dh, dw_, per_split,
                    *x.stride(), *grad.stride(), PRECISION=precision(x.dtype, x.device), **cfg)
        dw = (part.sum(0).reshape(groups, kh, kw, cin_g, cout_g).permute(0, 4, 3, 1, 2)
              .reshape(cout, cin_g, kh, kw).to(weight.dtype).contiguous())
    return dx, dw
