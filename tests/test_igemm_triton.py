"""The implicit-GEMM core (kernels/igemm.py) through a small Conv2d forward written here on top of it: its
hooks (the loader's affine + activation prologue, the epilogue's residual add and per-(sample, group)
partial sums) against float64 PyTorch, under the interpreter on CPU tensors (or on a GPU where present)."""

import math

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from vlfast.activations import CODE, activate
from vlfast.kernels.igemm import epilogue, k_loop, swizzle
from vlfast.testing import assert_close

from conftest import DEVICES, runnable

DTYPES = [torch.float32, torch.float16]  # bf16 tl.dot is broken under the interpreter
BLOCK_M, BLOCK_N, BLOCK_K = 16, 16, 16


@triton.jit
def _conv2d_kernel(
    x_ptr,      # (N, G*CIN_G, H, W) input, any strides
    w_ptr,      # (G, KH, KW, CIN_G, COUT_G) arranged weight, contiguous
    bias_ptr,   # (G*COUT_G,) bias
    out_ptr,    # (N, G*COUT_G, OH, OW) output, any strides
    res_ptr,    # (N, G*COUT_G, OH, OW) residual, any strides (RESIDUAL)
    a_ptr,      # (N, G*CIN_G) float32 prologue scale, contiguous (PROLOGUE)
    b_ptr,      # (N, G*CIN_G) float32 prologue shift, contiguous (PROLOGUE)
    stats_ptr,  # (N, row tiles, G*COUT_G / SEG, 2) float32 partial sums, contiguous (STATS)
    H, W, OH, OW, CIN_G, COUT_G, SH, SW, PH, PW, DH, DW,
    stride_xn, stride_xc, stride_xh, stride_xw, stride_on, stride_oc, stride_oh, stride_ow,
    stride_rn, stride_rc, stride_rh, stride_rw,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PROLOGUE: tl.constexpr,
    PRO_ACT: tl.constexpr, RESIDUAL: tl.constexpr, STATS: tl.constexpr, SEG: tl.constexpr,
    PHASE_FORM: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Grid: (row tiles of one sample x Cout tiles, N, G): every tile's rows are in sample n.
    n = tl.program_id(1)
    g = tl.program_id(2)
    tiles_m = tl.cdiv(OH * OW, BLOCK_M)
    pid_m, pid_n = swizzle(tl.program_id(0), tiles_m, tl.cdiv(COUT_G, BLOCK_N), 2)
    p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = p < OH * OW
    oh = p // OW
    ow = p % OW
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < COUT_G

    # The K loop: tap (r, s) reads x[oh*SH - PH + r*DH, ow*SW - PW + s*DW] against weight matrix (r, s).
    x_row = n.to(tl.int64) * stride_xn + (g * CIN_G).to(tl.int64) * stride_xc
    pro_row = tl.zeros((BLOCK_M,), dtype=tl.int32) + (n * tl.num_programs(2) + g) * CIN_G
    w_g = w_ptr + g.to(tl.int64) * KH * KW * CIN_G * COUT_G
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if PHASE_FORM:  # the same taps through the phase kernel's form: matrix (0 + jh*1)*KW + 0 + jw*1
        acc = k_loop(acc, x_ptr, w_g, x_row, -PH, -PW, oh * SH, ow * SW, row_ok, co, co_ok, KH * KW, KW, DH, DW,
                     CIN_G, COUT_G, H, W, stride_xc, stride_xh, stride_xw, BLOCK_K, PRECISION,
                     w_taps=(0, 0, 1, 1, KW), pro_a_ptr=a_ptr, pro_b_ptr=b_ptr, pro_row=pro_row, PROLOGUE=PROLOGUE,
                     PRO_ACT=PRO_ACT)
    else:
        acc = k_loop(acc, x_ptr, w_g, x_row, -PH, -PW, oh * SH, ow * SW, row_ok, co, co_ok, KH * KW, KW, DH, DW,
                     CIN_G, COUT_G, H, W, stride_xc, stride_xh, stride_xw, BLOCK_K, PRECISION,
                     ONE_TAP=KH * KW == 1, pro_a_ptr=a_ptr, pro_b_ptr=b_ptr, pro_row=pro_row, PROLOGUE=PROLOGUE,
                     PRO_ACT=PRO_ACT)

    # The epilogue, with this tile's row of partial sums.
    co_global = g * COUT_G + co
    out_row = n.to(tl.int64) * stride_on + oh.to(tl.int64) * stride_oh + ow.to(tl.int64) * stride_ow
    res_row = n.to(tl.int64) * stride_rn + oh.to(tl.int64) * stride_rh + ow.to(tl.int64) * stride_rw
    stats_row = stats_ptr + (n * tiles_m + pid_m).to(tl.int64) * (tl.num_programs(2) * COUT_G // SEG) * 2
    epilogue(acc, out_ptr, bias_ptr, out_row, co_global.to(tl.int64) * stride_oc, row_ok[:, None] & co_ok[None, :],
             co_global, co_ok, HAS_BIAS, ACT, res_ptr, res_row, co_global.to(tl.int64) * stride_rc, RESIDUAL,
             stats_row, (g * COUT_G + pid_n * BLOCK_N) // SEG, STATS, SEG)


def _seg(channels_per_group: int, cout_g: int) -> int:
    """The largest power of two dividing the channels of a GroupNorm group and of a conv group (where the
    column tiles start), at most BLOCK_N."""
    c = math.gcd(channels_per_group, cout_g)
    return min(c & -c, BLOCK_N)


def conv2d(x, w, bias, stride, padding, dilation, groups, act=None, out=None, prologue=None, residual=None,
           stats_groups=None, phase_form=False):
    """act(F.conv2d(pro(x), w, bias, ...) (+ residual)) into ``out`` by the test kernel; pro(x) = pact(x*a + b)
    for ``prologue`` = (a, b, pact). With ``stats_groups``: also (N, stats_groups, 2) sums of out per group."""
    n, cin, h, wd = x.shape
    cout, cin_g, kh, kw = w.shape
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if out is None:
        out = torch.full((n, cout, oh, ow), float("nan"), dtype=x.dtype, device=x.device)
    wt = w.reshape(groups, cout // groups, cin_g, kh, kw).permute(0, 3, 4, 2, 1).contiguous()
    a, b, pact = prologue if prologue is not None else (None, None, None)
    seg = _seg(cout // stats_groups, cout // groups) if stats_groups else 1
    tiles_m = triton.cdiv(oh * ow, BLOCK_M)
    stats = torch.full((n, tiles_m, cout // seg, 2), float("nan"), dtype=torch.float32, device=x.device)
    res = residual if residual is not None else out
    grid = (tiles_m * triton.cdiv(cout // groups, BLOCK_N), n, groups)
    _conv2d_kernel[grid](
        x, wt, bias if bias is not None else wt, out, res, a if a is not None else stats, b if b is not None else stats,
        stats, h, wd, oh, ow, cin_g, cout // groups, *stride, *padding, *dilation, *x.stride(), *out.stride(),
        *res.stride(), KH=kh, KW=kw, HAS_BIAS=bias is not None, ACT=CODE[act], PROLOGUE=prologue is not None,
        PRO_ACT=CODE[pact], RESIDUAL=residual is not None, STATS=bool(stats_groups), SEG=seg, PHASE_FORM=phase_form,
        PRECISION="ieee", BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    if not stats_groups:
        return out, None
    return out, stats.sum(1).reshape(n, stats_groups, -1, 2).sum(2)


def reference(x, w, bias, stride, padding, dilation, groups, act=None, prologue=None, residual=None):
    """float64: act(conv2d(pro(x)) (+ residual)), pro(x) rounded to x's dtype as the kernel feeds tl.dot."""
    xin = x.double()
    if prologue is not None:
        a, b, pact = prologue
        xin = activate(xin * a.double()[:, :, None, None] + b.double()[:, :, None, None], pact).to(x.dtype).double()
    y = F.conv2d(xin, w.double(), None if bias is None else bias.double(), stride, padding, dilation, groups)
    return activate(y if residual is None else y + residual.double(), act)


def _device():
    devices = [d for d in DEVICES if "triton" in runnable(d)]
    if not devices:
        pytest.skip("no device runs the Triton kernels here")
    return "cuda" if "cuda" in devices else devices[0]


def _inputs(n, cin, cout, h, w, k, groups, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g)
    wt = torch.randn(cout, cin // groups, k, k, generator=g) / (cin // groups * k * k) ** 0.5
    bias = torch.randn(cout, generator=g)
    return x.to(device, dtype), wt.to(device, dtype), bias.to(device, dtype), g


def _close(got, want, dtype, name="out"):
    tol = 1e-4 if dtype == torch.float32 else 4e-3  # fp16: the output's own rounding, fp32 accumulation
    assert_close(got, want.to(dtype), dtype, rtol=tol, atol=tol, name=name)


# (N, Cin, Cout, H, W, k, stride, padding, dilation, groups): dilated "same", strided with groups, 1x1, and a
# padding wider than the dilated kernel's reach (whole rows of taps fall outside the image).
GEOMETRIES = [
    (2, 6, 5, 7, 6, 3, 1, 2, 2, 1),
    (1, 8, 6, 6, 7, 3, 2, 1, 1, 2),
    (2, 5, 3, 4, 5, 1, 1, 0, 1, 1),
    (1, 3, 4, 5, 3, 2, 1, 3, 3, 1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("phase_form", [False, True], ids=["dense-taps", "phase-taps"])
@pytest.mark.parametrize("geo", GEOMETRIES, ids=[f"geo{i}" for i in range(len(GEOMETRIES))])
def test_prologue_affine_activation(geo, phase_form, dtype):
    """The loader's prologue: act(x * a[n, c] + b[n, c]) on every pixel inside the image, and the padding stays
    0 (b is far from 0, so act(b) in the padding would show), through both forms of the K loop."""
    device = _device()
    n, cin, cout, h, w, k, s, p, d, groups = geo
    x, wt, bias, g = _inputs(n, cin, cout, h, w, k, groups, dtype, device, seed=sum(geo))
    a = (torch.rand(n, cin, generator=g) + 0.5).to(device)
    b = (torch.randn(n, cin, generator=g) + 2.0).to(device)
    x = x.to(memory_format=torch.channels_last) if geo[0] == 1 else x  # any input strides
    for pact, act in (("silu", "relu"), ("gelu", None)):
        got, _ = conv2d(x, wt, bias, (s, s), (p, p), (d, d), groups, act, prologue=(a, b, pact),
                        phase_form=phase_form)
        want = reference(x, wt, bias, (s, s), (p, p), (d, d), groups, act, prologue=(a, b, pact))
        _close(got, want, dtype, f"prologue {pact}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("gn_groups,groups", [(2, 1), (4, 2), (3, 1), (1, 2)], ids=lambda v: str(v))
def test_group_sums(gn_groups, groups, dtype):
    """The epilogue's partial sums: per (sample, GroupNorm group), sum and sum of squares of the stored output
    (several row tiles per sample, column tiles wider than a conv group, groups of 2, 3, 4 and 12 channels)."""
    device = _device()
    cout = 12 if gn_groups != 2 else 8
    x, wt, bias, _ = _inputs(2, 4, cout, 7, 9, 3, groups, dtype, device, seed=gn_groups)
    got, stats = conv2d(x, wt, bias, (1, 1), (1, 1), (1, 1), groups, "silu", stats_groups=gn_groups)
    _close(got, reference(x, wt, bias, (1, 1), (1, 1), (1, 1), groups, "silu"), dtype)
    y = got.double().reshape(2, gn_groups, -1)
    want = torch.stack([y.sum(-1), (y * y).sum(-1)], -1)
    assert_close(stats, want, torch.float32, rtol=1e-5, atol=1e-3, name="group sums")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
def test_residual_into_channel_slice(dtype):
    """The epilogue's residual add (before the activation), read through its own strides, written into a
    channel slice of a concat buffer whose other channels stay as they were; with the sums of the stored sum."""
    device = _device()
    x, wt, bias, g = _inputs(2, 6, 8, 5, 6, 3, 2, dtype, device, seed=7)
    res = torch.randn(2, 8, 5, 6, generator=g).to(device, dtype).to(memory_format=torch.channels_last)
    buf = torch.full((2, 11, 5, 6), float("nan"), dtype=dtype, device=device)
    buf[:, :2] = 1.0
    buf[:, 10:] = 2.0
    got, stats = conv2d(x, wt, bias, (1, 1), (1, 1), (1, 1), 2, "gelu", out=buf[:, 2:10], residual=res,
                        stats_groups=4)
    _close(got, reference(x, wt, bias, (1, 1), (1, 1), (1, 1), 2, "gelu", residual=res), dtype)
    assert torch.equal(buf[:, :2], torch.full_like(buf[:, :2], 1.0))
    assert torch.equal(buf[:, 10:], torch.full_like(buf[:, 10:], 2.0))
    y = got.double().reshape(2, 4, -1)
    assert_close(stats, torch.stack([y.sum(-1), (y * y).sum(-1)], -1), torch.float32, rtol=1e-5, atol=1e-3,
                 name="group sums")
