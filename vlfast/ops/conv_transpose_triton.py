"""Triton launchers of the fused transposed convolution (kernels: vlfast/kernels/conv_transpose.py; spec:
vlfast/reference/conv_transpose.py). The custom op, its autograd and the checks live in
vlfast/ops/conv_transpose.py; :func:`conv_transpose2d_into` is its Triton backend.

Kernels, chosen from the geometry (``kernel_for``; the private knob ``conv_transpose_kernel`` of
vlfast/ops/_overrides.py forces one, for tests and benchmark probes):

- dilation 1 and kernel sizes that are multiples of the stride ("subpixel": the U-Net up-conv k == s,
  the VAE's k4 s2, FCN's k = 2s): one GEMM over output cells whose epilogue scatters each cell's
  s_h x s_w block. Rows that no input pixel reaches (output_padding past the last cell) get act(bias)
  from a small torch fill. Where x or the output is W-contiguous (NCHW), row tiles are 2-D blocks
  of cells within one sample, so that loads along W are contiguous, and an NCHW output is stored
  as whole row segments (with a power-of-two stride along W). An NCHW input is read in place
  when it has one tap; with several taps and 16 or more channels per group it is first made
  channels_last (one pass over x), so that the gathered input tiles have contiguous K rows;
- everything else ("phase"): the phase (sub-pixel) kernel, all s_h*s_w phases in one launch, with
  the same channels_last rule. Where k is not a multiple of s the sub-pixel GEMM would multiply its
  padded zero taps by real inputs, and an inf or NaN input would then make NaNs that PyTorch does not
  (0 * inf); the phase kernel multiplies real taps only, so NaN and inf propagate as in PyTorch.

Tile rules, the TF32 rule and the weight arrangements are the implicit-GEMM host side, vlfast/ops/igemm.py.
The weight is re-arranged on every call (one copy kernel; see ``arranged_weight`` for why it is not
cached), and float32 on CUDA reads PyTorch's TF32 setting on every call.
"""

import functools
import math
from typing import Optional

import torch
from torch import Tensor

from .. import backends
from ..reference.conv_transpose import ACTIVATIONS, activate
from . import _overrides
from ._common import cdiv, pow2
from .igemm import (arranged_weight, backward_config, clamp_pow2, phase_config, precision, precision_rule,
                    split_k, subpixel_config)

__all__ = ["conv_transpose2d_into", "plan_into", "conv_transpose2d_backward", "kernel_for",
           "precision"]


def kernel_for(kernel_size, stride, dilation) -> str:
    """"subpixel" for dilation 1 and kernel sizes that are multiples of the stride (no padded zero taps),
    else "phase"."""
    return "subpixel" if subpixel_takes(kernel_size, stride, dilation) else "phase"


def subpixel_takes(kernel_size, stride, dilation) -> bool:
    """Whether the sub-pixel kernel computes this geometry as PyTorch does, NaN and inf included: dilation 1
    and no padded zero tap (a padded tap would multiply real inputs by 0, and 0 * inf is NaN)."""
    return all(d == 1 and k % s == 0 for k, s, d in zip(kernel_size, stride, dilation))


def _channels_last_strides(shape) -> tuple[int, int, int, int]:
    """The strides of ``x.contiguous(memory_format=torch.channels_last)`` for an (N, C, H, W) shape."""
    _, c, h, w = shape
    return h * w * c, 1, w * c, c


def _cells(size: int, out_size: int, k: int, s: int, p: int) -> tuple[int, int, int]:
    """Along one axis: (taps T, first cell, number of cells) of the sub-pixel kernel. Cell c covers output
    pixels [c*s - p, c*s - p + s); only cells that some input pixel reaches (c < size + T - 1) are computed."""
    t = cdiv(k, s)
    first = p // s
    end = min((out_size - 1 + p) // s + 1, size + t - 1)
    return t, first, max(0, end - first)


@functools.lru_cache(maxsize=256)
def phase_steps(s: int, d: int) -> tuple[int, int, int, int]:
    """Per axis, for the phase kernel: (gcd(d, s), inverse of d/g modulo s/g, tap step s/g, input step -d/g)."""
    g = math.gcd(d, s)
    return g, pow(d // g, -1, s // g), s // g, -(d // g)


def _fill_uncovered(out: Tensor, bias: Optional[Tensor], activation: int, row0: int, col0: int) -> None:
    """out[..., row0:, :] and out[..., :, col0:] = act(bias) (0 without bias: every activation maps 0 to 0)."""
    regions = [r for r in (out[:, :, row0:, :], out[:, :, :row0, col0:]) if r.numel()]
    if not regions:
        return
    if bias is None:
        for r in regions:
            r.zero_()
        return
    fill = activate(bias.float(), ACTIVATIONS[activation]).to(out.dtype).view(1, -1, 1, 1)
    for r in regions:
        r.copy_(fill.expand_as(r))


def conv_transpose2d_into(out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding,
                          output_padding, groups: int, dilation, activation: int) -> Tensor:
    """Write ``act(F.conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups, dilation))``
    into ``out`` and return it.

    x: (N, Cin, H, W), any strides; weight: (Cin, Cout/groups, KH, KW); bias: (Cout,) or None;
    out: (N, Cout, OH, OW) with any strides (e.g. a channel slice of a concat buffer), x's dtype;
    float32/float16/bfloat16; activation: 0 none, 1 silu, 2 relu, 3 gelu (erf). The kernel is
    :func:`kernel_for`'s, or the ``conv_transpose_kernel`` override's ("subpixel" where
    :func:`subpixel_takes` the geometry, or "phase"; tests, benchmarks). Arguments are assumed checked
    (vlfast.ops.conv_transpose.conv_transpose2d does it).
    """
    run = plan_into(out, x, weight, bias, stride, padding, output_padding, groups, dilation, activation)
    return run(out, x, weight, bias)


def plan_into(out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, output_padding,
              groups: int, dilation, activation: int):
    """Everything :func:`conv_transpose2d_into` works out from the tensors' metadata (kernel, cells, tiles,
    layouts, launch arguments), as ``run(out, x, weight, bias) -> out``, valid for any tensors with the
    same shapes, strides, dtypes and device as these; the op caches it per geometry. ``run`` still looks up
    the weight's arrangement each call (a copy: whatever wrote the weight, the call sees it) and, for
    float32 on CUDA, PyTorch's TF32 setting."""
    from vlfast.kernels.conv_transpose import conv_transpose2d_phase_kernel, conv_transpose2d_subpixel_kernel

    if x.dtype not in backends.KERNEL_DTYPES:
        raise TypeError(f"the Triton conv_transpose2d takes {backends.KERNEL_DTYPES}, got {x.dtype}")
    n, cin, h, w = x.shape
    cout, oh, ow = out.shape[1:]
    _, cout_g, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    kernel = _overrides.get("conv_transpose_kernel") or kernel_for((kh, kw), stride, dilation)
    if kernel not in ("subpixel", "phase") or (kernel == "subpixel"
                                               and not subpixel_takes((kh, kw), stride, dilation)):
        raise ValueError(f"kernel must be 'phase' or, for dilation 1 and kernel sizes that are multiples of the "
                         f"stride, 'subpixel'; got {kernel!r} for kernel {(kh, kw)}, stride {tuple(stride)}, "
                         f"dilation {tuple(dilation)}")
    cin_g = cin // groups

    def fill(rows0: int, cols0: int):
        """run for outputs that get act(bias) only from row rows0 and column cols0 on (and no kernel)."""
        def run(out, x, weight, bias):
            _fill_uncovered(out, bias, activation, rows0, cols0)
            return out
        return run

    if out.numel() == 0:
        return lambda out, *rest: out
    if n * cin * h * w == 0 or cin_g == 0:  # nothing to multiply: act(bias) everywhere
        return fill(0, 0)
    if max(x[0].numel(), out[0].numel(), weight.numel()) >= 2**31:
        raise ValueError("one sample holds 2**31 or more elements; the kernels index a sample with int32")
    common = dict(HAS_BIAS=bias is not None, ACT=activation)
    prec = precision_rule(x.dtype, x.device)
    bias_copy = bias is not None and not bias.is_contiguous()

    def bias_arg(bias, weight):
        return weight if bias is None else bias.contiguous() if bias_copy else bias

    if kernel == "subpixel":
        (th, ch0, n_ch), (tw, cw0, n_cw) = _cells(h, oh, kh, sh, ph), _cells(w, ow, kw, sw, pw)
        # Cells past the last input pixel (output_padding) have no taps: act(bias), by a torch fill.
        rows0, cols0 = max(0, (ch0 + n_ch) * sh - ph), max(0, (cw0 + n_cw) * sw - pw)
        uncovered = rows0 < oh or cols0 < ow
        if not (n_ch and n_cw):
            return fill(rows0, cols0)
        # See the module docstring: with several taps, a channel-contiguous input.
        to_cl = (th, tw) != (1, 1) and x.stride(1) != 1 and cin_g >= 16
        xs = _channels_last_strides(x.shape) if to_cl else x.stride()
        rw_inner = out.stride(3) == 1 and out.stride(1) != 1
        m, n_cols = n * n_ch * n_cw, sh * sw * cout_g
        crop = ph % sh or pw % sw or (ch0 + n_ch) * sh - ph > oh or (cw0 + n_cw) * sw - pw > ow
        # An NCHW output is stored as whole row segments when the stride along W is a power of two.
        w_rows = rw_inner and (sw & (sw - 1)) == 0
        wide = (th, tw) == (1, 1) and not crop and (w_rows or not rw_inner)
        cfg = subpixel_config(m, n_cols, th * tw * cin_g, cin_g, x.dtype, wide)
        w_rows = w_rows and cfg["BLOCK_N"] % sw == 0
        w_tile = min(pow2(n_cw), cfg["BLOCK_M"]) if w_rows or (xs[3] == 1 and xs[1] != 1) else 0
        if w_tile:
            m_tiles = n * cdiv(n_ch, cfg["BLOCK_M"] // w_tile) * cdiv(n_cw, w_tile)
        else:
            m_tiles = cdiv(m, cfg["BLOCK_M"])
        order = "subpixel_rw" if rw_inner else "subpixel_co"
        launch = conv_transpose2d_subpixel_kernel[(m_tiles * cdiv(n_cols, cfg["BLOCK_N"]), groups)]
        ints = (n, h, w, oh, ow, ch0, cw0, n_ch, n_cw, ch0 * sh - ph, cw0 * sw - pw, cin_g, cout_g, sh, *xs,
                *out.stride())
        consts = {p: dict(common, PRECISION=p, TH=th, TW=tw, SW=sw, RW_INNER=rw_inner, W_TILE=w_tile,
                          W_ROWS_STORE=w_rows, CROP=bool(crop), **cfg) for p in ("ieee", "tf32")}

        def run_subpixel(out, x, weight, bias):
            if to_cl:
                x = x.contiguous(memory_format=torch.channels_last)
            with backends.device_guard(x):
                launch(x, arranged_weight(weight, groups, order, stride), bias_arg(bias, weight), out, *ints,
                       **consts[prec()])
                if uncovered:
                    _fill_uncovered(out, bias, activation, rows0, cols0)
            return out
        return run_subpixel

    # The phase kernel; its input tiles gather pixels of the phase: only a channel-contiguous input gives
    # them contiguous K rows that load vectorised and pipeline, worth one pass over x.
    to_cl = x.stride(1) != 1 and cin_g >= 16
    xs = _channels_last_strides(x.shape) if to_cl else x.stride()
    (gh, invh, dkh, dih), (gw, invw, dkw, diw) = phase_steps(sh, dh), phase_steps(sw, dw)
    m_max = n * cdiv(oh, sh) * cdiv(ow, sw)  # the phase that starts at pixel 0 is the largest
    cfg = phase_config(m_max, cout_g, cin_g, x.dtype)
    num_m = cdiv(m_max, cfg["BLOCK_M"])
    launch = conv_transpose2d_phase_kernel[(num_m * cdiv(cout_g, cfg["BLOCK_N"]), sh * sw, groups)]
    ints = (n, h, w, oh, ow, cin_g, cout_g, kh, kw, sh, sw, ph, pw, dh, dw, gh, gw, invh, invw, dkh, dkw, dih, diw,
            num_m, *xs, *out.stride())
    consts = {p: dict(common, PRECISION=p, **cfg) for p in ("ieee", "tf32")}

    def run_phase(out, x, weight, bias):
        if to_cl:
            x = x.contiguous(memory_format=torch.channels_last)
        with backends.device_guard(x):
            launch(x, arranged_weight(weight, groups, "taps"), bias_arg(bias, weight), out, *ints, **consts[prec()])
        return out
    return run_phase


def conv_transpose2d_backward(grad: Tensor, x: Tensor, weight: Tensor, stride, padding, groups: int,
                              needs: tuple[bool, bool]) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(dx, dweight) of ``F.conv_transpose2d(x, weight, stride=stride, padding=padding, groups=groups)`` at
    dilation 1 (any output_padding), given ``grad`` of the output; None where ``needs`` says no.

    Both are GEMMs against the forward's sub-pixel weight arrangement (kernels/conv_transpose.py): dx one
    over the input pixels, dweight one over the output cells, split into float32 partials summed in a fixed
    order (deterministic). x, grad: any strides; float32/float16/bfloat16. Equivalent::

        dx, dw, _ = torch.ops.aten.convolution_backward(grad, x, weight, None, stride, padding, (1, 1), True,
                                                        output_padding, groups, [True, True, False])
    """
    from vlfast.kernels.conv_transpose import conv_transpose2d_dgrad_kernel, conv_transpose2d_wgrad_kernel

    n, cin, h, w = x.shape
    _, _, oh, ow = grad.shape
    _, cout_g, kh, kw = weight.shape
    (sh, sw), (ph, pw) = stride, padding
    cin_g = cin // groups
    prec = precision(x.dtype, x.device)
    dx = dw = None
    with backends.device_guard(x):
        (th, ch0, n_ch), (tw, cw0, n_cw) = _cells(h, oh, kh, sh, ph), _cells(w, ow, kw, sw, pw)
        wsp = arranged_weight(weight, groups, "subpixel_co", stride)
        if needs[0]:
            dx = torch.empty_like(x)
            if dx.numel():
                cfg = backward_config(n * h * w, cin_g, sw * cout_g, x.dtype)
                grid = (cdiv(n * h * w, cfg["BLOCK_M"]) * cdiv(cin_g, cfg["BLOCK_N"]), groups)
                conv_transpose2d_dgrad_kernel[grid](
                    grad, wsp, dx, n, h, w, oh, ow, cin_g, cout_g, kh, kw, sh, ph, pw, *grad.stride(), *dx.stride(),
                    PRECISION=prec, TH=th, TW=tw, SW=sw, GROUP_M=8, **cfg)
        if needs[1]:
            rows, cols, cells = th * tw * cin_g, sh * sw * cout_g, n * n_ch * n_cw
            cfg = backward_config(rows, cols, cells, x.dtype)
            cfg["BLOCK_M"] = clamp_pow2(rows, 16, cfg["BLOCK_M"])
            tiles = cdiv(rows, cfg["BLOCK_M"]) * cdiv(cols, cfg["BLOCK_N"]) * groups
            split, per_split = split_k(cells, tiles, cfg["BLOCK_K"], x.device)
            part = torch.zeros((split, groups, rows, cols), dtype=torch.float32, device=x.device)
            if cells:
                conv_transpose2d_wgrad_kernel[(tiles // groups, split, groups)](
                    x, grad, part, n, h, w, oh, ow, ch0, cw0, n_ch, n_cw, cin_g, cout_g, sh, ph, pw, per_split,
                    *x.stride(), *grad.stride(), PRECISION=prec, TH=th, TW=tw, SW=sw, **cfg)
            dwsp = part.sum(0)  # a fixed order
            dw = (dwsp.reshape(groups, th, tw, cin_g, sh, sw, cout_g).permute(0, 3, 6, 1, 4, 2, 5)
                  .reshape(cin, cout_g, th * sh, tw * sw)[:, :, :kh, :kw].to(weight.dtype).contiguous())
    return dx, dw
