"""Triton launchers of the fused transposed convolution (kernels: vlfast/kernels/conv_transpose.py; spec:
vlfast/reference/conv_transpose.py). The custom op, its autograd and the checks live in
vlfast/ops/conv_transpose.py; :func:`conv_transpose2d_into` is its Triton backend.

Paths, chosen from the geometry:

- k == s, padding 0, dilation 1 (any groups, output_padding): one GEMM per group whose epilogue
  scatters k x k blocks; the output_padding rows/columns no input pixel reaches get act(bias) from a
  small torch fill. Either input layout is read in place (NCHW: row tiles within one sample, so
  their loads are contiguous); the weight's columns are ordered for the output's layout;
- everything else: the phase (sub-pixel) kernel, all s_h*s_w phases in one launch. An NCHW input
  with 16 or more channels per group is first made channels_last (one pass over x), so that the
  gathered input tiles have contiguous K rows.

The re-arranged weights are cached per weight tensor and version (``arranged_weight``): an in-place
update (optimizer step, load_state_dict) makes a new version and is seen at the next call.
"""

import functools
import math
import weakref
from collections import OrderedDict
from typing import Optional

import torch
from torch import Tensor

from .. import backends
from ._common import cdiv, pow2

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_WT_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_WT_CACHE_SIZE = 32


def _clamp_pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, pow2(n)))


def precision(dtype: torch.dtype, device: torch.device) -> str:
    """tl.dot's input_precision: TF32 for float32 only where PyTorch's convolutions may use it."""
    if dtype == torch.float32 and (device.type != "cuda" or not torch.backends.cudnn.allow_tf32):
        return "ieee"
    return "tf32"  # ignored by tl.dot for 16-bit inputs


# Problems below this many multiply-adds share one small tile config: one compile serves them all.
SMALL_MACS = 1 << 24
SMALL = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2)


def gemm_config(m: int, n_cols: int, cin_g: int, dtype: torch.dtype) -> dict:
    """Tiles of conv_transpose2d_gemm_kernel: M = N*H*W rows, n_cols = k*k*Cout/G columns, K = Cin/G."""
    if backends.interpret_mode():
        return dict(BLOCK_M=_clamp_pow2(m, 16, 64), BLOCK_N=_clamp_pow2(n_cols, 16, 32), BLOCK_K=16, GROUP_M=4,
                    num_warps=4, num_stages=1)
    if m * n_cols * cin_g < SMALL_MACS:
        return dict(SMALL)
    fp32 = dtype == torch.float32
    block_n = 128 if n_cols >= 128 else _clamp_pow2(n_cols, 16, 64)
    block_k = _clamp_pow2(cin_g, 16, 32 if fp32 else 64)
    return dict(BLOCK_M=128 if m >= 4096 else 64, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
                num_warps=8 if block_n == 128 else 4, num_stages=3 if fp32 else 4)


def phase_config(m: int, cout_g: int, cin_g: int, dtype: torch.dtype) -> dict:
    """Tiles of conv_transpose2d_phase_kernel: M = a phase's N*TH*TW output pixels, N = Cout/G, K = taps x Cin/G."""
    if backends.interpret_mode():
        return dict(BLOCK_M=_clamp_pow2(m, 16, 64), BLOCK_N=_clamp_pow2(cout_g, 16, 32), BLOCK_K=16, GROUP_M=4,
                    num_warps=4, num_stages=1)
    if m * cout_g * cin_g < SMALL_MACS:
        return dict(SMALL)
    fp32 = dtype == torch.float32
    block_n = _clamp_pow2(cout_g, 16, 128)
    block_k = _clamp_pow2(cin_g, 16, 32 if fp32 else 64)
    return dict(BLOCK_M=128 if m >= 4096 else 64, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
                num_warps=8 if block_n == 128 else 4, num_stages=3 if fp32 else 4)


# Weight arrangements: (Cin, Cout/G, KH, KW) viewed as (G, Cin/G, Cout/G, KH, KW), then permuted.
ORDERS = {"taps": (0, 3, 4, 1, 2),       # (G, KH, KW, Cin/G, Cout/G): the phase kernel
          "gemm_co": (0, 1, 3, 4, 2),    # (G, Cin/G, KH, KW, Cout/G): the GEMM kernel, channel-contiguous out
          "gemm_kw": (0, 1, 3, 2, 4)}    # (G, Cin/G, KH, Cout/G, KW): the GEMM kernel, W-contiguous out


def arranged_weight(weight: Tensor, groups: int, order: str) -> Tensor:
    """The weight permuted to ``ORDERS[order]``, contiguous; cached per weight tensor and version."""
    key = (id(weight), weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype, weight.device,
           groups, order)
    hit = _WT_CACHE.get(key)
    if hit is not None and hit[0]() is weight:
        _WT_CACHE.move_to_end(key)
        return hit[1]
    cin, cout_g, kh, kw = weight.shape
    wt = weight.detach().reshape(groups, cin // groups, cout_g, kh, kw).permute(*ORDERS[order]).contiguous()
    try:
        _WT_CACHE[key] = (weakref.ref(weight), wt)
    except TypeError:  # a tensor subclass without weak references: no caching
        return wt
    while len(_WT_CACHE) > _WT_CACHE_SIZE:
        _WT_CACHE.popitem(last=False)
    return wt


@functools.lru_cache(maxsize=256)
def phase_steps(s: int, d: int) -> tuple[int, int, int, int]:
    """Per axis, for the phase kernel: (gcd(d, s), inverse of d/g modulo s/g, tap step s/g, input step -d/g)."""
    g = math.gcd(d, s)
    return g, pow(d // g, -1, s // g), s // g, -(d // g)


def _fill_uncovered(out: Tensor, bias: Optional[Tensor], activation: int, row0: int, col0: int) -> None:
    """out[..., row0:, :] and out[..., :, col0:] = act(bias) (0 without bias: every activation maps 0 to 0)."""
    from ..reference.conv_transpose import ACTIVATIONS, activate
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
    float32/float16/bfloat16; activation: 0 none, 1 silu, 2 relu, 3 gelu (erf). Arguments are
    assumed checked (vlfast.ops.conv_transpose.conv_transpose2d does it).
    """
    from vlfast.kernels.conv_transpose import conv_transpose2d_gemm_kernel, conv_transpose2d_phase_kernel

    if x.dtype not in DTYPES:
        raise TypeError(f"the Triton conv_transpose2d takes {DTYPES}, got {x.dtype}")
    n, cin, h, w = x.shape
    cout, oh, ow = out.shape[1:]
    _, cout_g, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    if out.numel() == 0:
        return out
    cin_g = cin // groups
    if n * cin * h * w == 0 or cin_g == 0:  # nothing to multiply: act(bias) everywhere
        _fill_uncovered(out, bias, activation, 0, 0)
        return out
    if max(x[0].numel(), out[0].numel(), weight.numel()) >= 2**31:
        raise ValueError("one sample holds 2**31 or more elements; the kernels index a sample with int32")
    b = bias if bias is not None else weight
    if bias is not None and not bias.is_contiguous():
        b = bias.contiguous()
    common = dict(HAS_BIAS=bias is not None, ACT=activation, PRECISION=precision(x.dtype, x.device))

    with backends.device_guard(x):
        if (kh, kw) == (sh, sw) and (ph, pw) == (0, 0) and (dh, dw) == (1, 1):
            m, n_cols = n * h * w, kh * kw * cout_g
            kw_inner = out.stride(3) == 1 and out.stride(1) != 1
            wg = arranged_weight(weight, groups, "gemm_kw" if kw_inner else "gemm_co")
            hw_contig = x.stride(3) == 1 and x.stride(2) == w and x.stride(1) != 1  # NCHW-like: rows contiguous
            cfg = gemm_config(m, n_cols, cin_g, x.dtype)
            m_tiles = n * cdiv(h * w, cfg["BLOCK_M"]) if hw_contig else cdiv(m, cfg["BLOCK_M"])
            grid = (m_tiles * cdiv(n_cols, cfg["BLOCK_N"]), groups)
            conv_transpose2d_gemm_kernel[grid](x, wg, b, out, n, h, w, cin_g, cout_g, kh, kw, sh, sw, *x.stride(),
                                               *out.stride(), **common, KW_INNER=kw_inner, HW_CONTIG=hw_contig,
                                               **cfg)
            _fill_uncovered(out, bias, activation, h * sh, w * sw)
            return out

        if x.stride(1) != 1 and cin_g >= 16:
            # The implicit GEMM's input tiles gather pixels of the phase: only a channel-contiguous input
            # gives them contiguous K rows that load vectorised and pipeline, worth one pass over x.
            x = x.contiguous(memory_format=torch.channels_last)
        (gh, invh, dkh, dih), (gw, invw, dkw, diw) = phase_steps(sh, dh), phase_steps(sw, dw)
        m_max = n * cdiv(oh, sh) * cdiv(ow, sw)  # the phase that starts at pixel 0 is the largest
        cfg = phase_config(m_max, cout_g, cin_g, x.dtype)
        num_m = cdiv(m_max, cfg["BLOCK_M"])
        grid = (num_m * cdiv(cout_g, cfg["BLOCK_N"]), sh * sw, groups)
        wt = arranged_weight(weight, groups, "taps")
        conv_transpose2d_phase_kernel[grid](x, wt, b, out, n, h, w, oh, ow, cin_g, cout_g, kh, kw, sh, sw, ph, pw,
                                            dh, dw, gh, gw, invh, invw, dkh, dkw, dih, diw, num_m, *x.stride(),
                                            *out.stride(), **common, **cfg)
    return out
