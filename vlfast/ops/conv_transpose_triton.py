"""Triton launchers of the fused transposed convolution (kernels: vlfast/kernels/conv_transpose.py; spec:
vlfast/reference/conv_transpose.py). The custom op, its autograd and the checks live in
vlfast/ops/conv_transpose.py; :func:`conv_transpose2d_into` is its Triton backend.

Kernels, chosen from the geometry (``kernel_for``; ``kernel=`` forces one):

- dilation 1 where padded zero taps are at most half the work ("subpixel"): one GEMM over output
  cells whose epilogue scatters each cell's s_h x s_w block (the U-Net up-conv k == s is its
  one-tap case). Rows that no input pixel reaches (output_padding past the last cell) get act(bias)
  from a small torch fill. Where x or the output is W-contiguous (NCHW), row tiles are 2-D blocks
  of cells within one sample, so that loads along W are contiguous, and an NCHW output is stored
  as whole row segments (with a power-of-two stride along W). An NCHW input is read in place
  when it has one tap; with several taps and 16 or more channels per group it is first made
  channels_last (one pass over x), so that the gathered input tiles have contiguous K rows;
- everything else ("phase"): the phase (sub-pixel) kernel, all s_h*s_w phases in one launch, with
  the same channels_last rule.

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
from ..reference.conv_transpose import ACTIVATIONS, activate
from ._common import cdiv, num_sms, pow2

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


def subpixel_config(m: int, n_cols: int, k: int, cin_g: int, dtype: torch.dtype, wide: bool = True) -> dict:
    """Tiles of conv_transpose2d_subpixel_kernel: M = N*cells rows, n_cols = s_h*s_w*Cout/G columns,
    K = taps*Cin/G (chunks of at most Cin/G: a K tile never straddles two taps). ``wide`` allows
    256-column tiles: only for one tap and no crop, with a channel-contiguous or row-segment store
    (compiled for sm_90 with Triton 3.6, 2026-11-26: 198-242 registers and no spills there; with two
    taps, a crop or the scattered W-contiguous store they spill, where 128-column tiles do not)."""
    if backends.interpret_mode():
        return _interpreter_tiles(m, n_cols)
    if m * n_cols * k < SMALL_MACS:
        return dict(SMALL)
    if wide and dtype != torch.float32 and m >= 4096 and n_cols >= 256 and cin_g >= 256:
        # The best of the plain-pointer configs on the U-Net up-conv's GEMM (8192x2048x1024) and a 3x3 conv's
        # (32768x256x2304) in the shared H100 Triton probe: 538 and 453 TF/s against 498-508 and 420 for 128x128.
        # Not below K = 256: a short K loop leaves one 256-column tile an SM mostly storing (unmeasured).
        return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    return _tiles(m, 128 if n_cols >= 128 else _clamp_pow2(n_cols, 16, 64), cin_g, dtype)


def phase_config(m: int, cout_g: int, cin_g: int, dtype: torch.dtype) -> dict:
    """Tiles of conv_transpose2d_phase_kernel: M = a phase's N*TH*TW output pixels, N = Cout/G, K = taps x Cin/G."""
    if backends.interpret_mode():
        return _interpreter_tiles(m, cout_g)
    if m * cout_g * cin_g < SMALL_MACS:
        return dict(SMALL)
    return _tiles(m, _clamp_pow2(cout_g, 16, 128), cin_g, dtype)


def _tiles(m: int, block_n: int, k_chunk: int, dtype: torch.dtype) -> dict:
    """The tile rule the GEMMs share: 128 rows from 4096 on; K chunks of up to 32 (fp32) or 64 (16-bit)
    elements, never longer than ``k_chunk``; 8 warps for 128 columns; more pipeline stages in 16-bit."""
    fp32 = dtype == torch.float32
    return dict(BLOCK_M=128 if m >= 4096 else 64, BLOCK_N=block_n, BLOCK_K=_clamp_pow2(k_chunk, 16, 32 if fp32 else 64),
                GROUP_M=8, num_warps=8 if block_n == 128 else 4, num_stages=3 if fp32 else 4)


def _interpreter_tiles(m: int, n: int) -> dict:
    """One small tile shape under the interpreter (CPU tests): few compiles, quick numpy."""
    return dict(BLOCK_M=_clamp_pow2(m, 16, 64), BLOCK_N=_clamp_pow2(n, 16, 32), BLOCK_K=16, GROUP_M=4, num_warps=4,
                num_stages=1)


def arranged_weight(weight: Tensor, groups: int, order: str, stride=(1, 1)) -> Tensor:
    """The weight arranged for a kernel, contiguous; cached per weight tensor and version.

    weight (Cin, Cout/G, KH, KW). ``order``: "taps" -> (G, KH, KW, Cin/G, Cout/G), one matrix per tap
    (phase kernel); "subpixel_co" / "subpixel_rw" -> (G, TH*TW*Cin/G, SH*SW*Cout/G) with rows
    (th, tw, ci) and columns (rh, rw, co) / (rh, co, rw), entry w[ci, co, rh + th*SH, rw + tw*SW] or 0
    past the kernel, TH = ceil(KH/SH), TW = ceil(KW/SW) (sub-pixel kernel).
    """
    key = (id(weight), weight.data_ptr(), weight._version, tuple(weight.shape), weight.dtype, weight.device,
           groups, order, tuple(stride))
    hit = _WT_CACHE.get(key)
    if hit is not None and hit[0]() is weight:
        _WT_CACHE.move_to_end(key)
        return hit[1]
    cin, cout_g, kh, kw = weight.shape
    w = weight.detach().reshape(groups, cin // groups, cout_g, kh, kw)
    if order == "taps":
        wt = w.permute(0, 3, 4, 1, 2).contiguous()
    else:
        (sh, sw), (th, tw) = stride, (cdiv(kh, stride[0]), cdiv(kw, stride[1]))
        w = torch.nn.functional.pad(w, (0, tw * sw - kw, 0, th * sh - kh))  # zero taps past the kernel
        w = w.reshape(groups, cin // groups, cout_g, th, sh, tw, sw)       # kh = t*SH + r
        dims = (0, 3, 5, 1, 4, 6, 2) if order == "subpixel_co" else (0, 3, 5, 1, 4, 2, 6)
        wt = w.permute(*dims).reshape(groups, th * tw * (cin // groups), sh * sw * cout_g).contiguous()
    try:
        _WT_CACHE[key] = (weakref.ref(weight), wt)
    except TypeError:  # a tensor subclass without weak references: no caching
        return wt
    while len(_WT_CACHE) > _WT_CACHE_SIZE:
        _WT_CACHE.popitem(last=False)
    return wt


def kernel_for(kernel_size, stride, dilation) -> str:
    """"subpixel" for dilation 1 when the padded zero taps are at most half of its multiplies, else "phase"."""
    if any(d != 1 for d in dilation):
        return "phase"
    padded = math.prod(cdiv(k, s) * s for k, s in zip(kernel_size, stride))
    return "subpixel" if padded <= 2 * math.prod(kernel_size) else "phase"


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
                          output_padding, groups: int, dilation, activation: int, *,
                          kernel: Optional[str] = None) -> Tensor:
    """Write ``act(F.conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups, dilation))``
    into ``out`` and return it.

    x: (N, Cin, H, W), any strides; weight: (Cin, Cout/groups, KH, KW); bias: (Cout,) or None;
    out: (N, Cout, OH, OW) with any strides (e.g. a channel slice of a concat buffer), x's dtype;
    float32/float16/bfloat16; activation: 0 none, 1 silu, 2 relu, 3 gelu (erf). ``kernel``:
    "subpixel" (dilation 1 only) or "phase" forces a kernel (tests, benchmarks); default
    :func:`kernel_for`. Arguments are assumed checked (vlfast.ops.conv_transpose.conv_transpose2d does it).
    """
    run = plan_into(out, x, weight, bias, stride, padding, output_padding, groups, dilation, activation,
                    kernel=kernel)
    return run(out, x, weight, bias)


def plan_into(out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, output_padding,
              groups: int, dilation, activation: int, *, kernel: Optional[str] = None):
    """Everything :func:`conv_transpose2d_into` works out from the tensors' metadata (kernel, cells, tiles,
    layouts, launch arguments), as ``run(out, x, weight, bias) -> out``, valid for any tensors with the
    same shapes, strides, dtypes and device as these; the op caches it per geometry. ``run`` still looks up
    the arranged weight each call (cached per weight version: an in-place update is seen)."""
    from vlfast.kernels.conv_transpose import conv_transpose2d_phase_kernel, conv_transpose2d_subpixel_kernel

    if x.dtype not in DTYPES:
        raise TypeError(f"the Triton conv_transpose2d takes {DTYPES}, got {x.dtype}")
    n, cin, h, w = x.shape
    cout, oh, ow = out.shape[1:]
    _, cout_g, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    kernel = kernel or kernel_for((kh, kw), stride, dilation)
    if kernel not in ("subpixel", "phase") or (kernel == "subpixel" and (dh, dw) != (1, 1)):
        raise ValueError(f"kernel must be 'phase' or, for dilation 1, 'subpixel'; got {kernel!r}")
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
    common = dict(HAS_BIAS=bias is not None, ACT=activation, PRECISION=precision(x.dtype, x.device))
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
        consts = dict(common, TH=th, TW=tw, SW=sw, RW_INNER=rw_inner, W_TILE=w_tile, W_ROWS_STORE=w_rows,
                      CROP=bool(crop), **cfg)

        def run_subpixel(out, x, weight, bias):
            if to_cl:
                x = x.contiguous(memory_format=torch.channels_last)
            with backends.device_guard(x):
                launch(x, arranged_weight(weight, groups, order, stride), bias_arg(bias, weight), out, *ints,
                       **consts)
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
    consts = dict(common, **cfg)

    def run_phase(out, x, weight, bias):
        if to_cl:
            x = x.contiguous(memory_format=torch.channels_last)
        with backends.device_guard(x):
            launch(x, arranged_weight(weight, groups, "taps"), bias_arg(bias, weight), out, *ints, **consts)
        return out
    return run_phase


def backward_config(m: int, n: int, k: int, dtype: torch.dtype) -> dict:
    """Tiles of the two backward GEMMs: M rows, N columns, K the reduction (no grouped order: GROUP_M is the
    dgrad launcher's)."""
    cfg = _interpreter_tiles(m, n) if backends.interpret_mode() else _tiles(m, _clamp_pow2(n, 16, 128), k, dtype)
    del cfg["GROUP_M"]
    return cfg


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
                    grad, wsp, dx, n, h, w, oh, ow, cin_g, cout_g, sh, ph, pw, *grad.stride(), *dx.stride(),
                    PRECISION=prec, TH=th, TW=tw, SW=sw, GROUP_M=8, **cfg)
        if needs[1]:
            rows, cols, cells = th * tw * cin_g, sh * sw * cout_g, n * n_ch * n_cw
            cfg = backward_config(rows, cols, cells, x.dtype)
            cfg["BLOCK_M"] = _clamp_pow2(rows, 16, cfg["BLOCK_M"])
            tiles = cdiv(rows, cfg["BLOCK_M"]) * cdiv(cols, cfg["BLOCK_N"]) * groups
            # Enough programs to fill the GPU: split the cells, each split a float32 partial.
            split = max(1, min(cdiv(2 * num_sms(x.device), tiles), cdiv(cells, 4 * cfg["BLOCK_K"])))
            per_split = cdiv(cdiv(max(cells, 1), split), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
            split = cdiv(max(cells, 1), per_split)
            part = torch.zeros((split, groups, rows, cols), dtype=torch.float32, device=x.device)
            if cells:
                conv_transpose2d_wgrad_kernel[(tiles // groups, split, groups)](
                    x, grad, part, n, h, w, oh, ow, ch0, cw0, n_ch, n_cw, cin_g, cout_g, sh, ph, pw, per_split,
                    *x.stride(), *grad.stride(), PRECISION=prec, TH=th, TW=tw, SW=sw, **cfg)
            dwsp = part.sum(0)  # a fixed order
            dw = (dwsp.reshape(groups, th, tw, cin_g, sh, sw, cout_g).permute(0, 3, 6, 1, 4, 2, 5)
                  .reshape(cin, cout_g, th * sh, tw * sw)[:, :, :kh, :kw].to(weight.dtype).contiguous())
    return dx, dw
