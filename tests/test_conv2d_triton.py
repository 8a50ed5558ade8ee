"""The Triton launchers of the fused convolution (vlfast/ops/conv2d_triton.py) called directly: both forward
kernels (the implicit GEMM and the depthwise one, forced where the heuristic picks the other), the backward
(dx through the transposed convolution's kernels, dweight by split partials) against aten in float64, and the
memory cases (an output that is a channel slice of a bigger buffer, aliases the residual or overlaps x).

Every output is poisoned with NaN first, so that an element no program writes fails. Under the interpreter
(CPU tensors) the shapes are small and the grid is sampled, not the full product; bf16 only goes through the
depthwise kernel there (bf16 tl.dot returns garbage under Triton 3.9's interpreter)."""

import pytest
import torch
import torch.nn.functional as F

from vlfast.testing import assert_close, assert_low_precision_close

from conftest import DT

ACTS = (None, "silu", "relu", "gelu")  # index = the kernels' activation code (vlfast/activations.py)


def case(n, cin, cout, hw, k, s=1, p=0, d=1, g=1):
    """A geometry; hw, k, s, p, d: an int or an (h, w) pair."""
    pair = (lambda v: tuple(v) if isinstance(v, tuple) else (v, v))
    return dict(n=n, cin=cin, cout=cout, hw=pair(hw), k=pair(k), s=pair(s), p=pair(p), d=pair(d), g=g)


CASES = [
    case(2, 3, 5, 7, 1),                                  # 1x1, a plain GEMM
    case(2, 5, 7, (1, 11), 1, p=2),                       # 1x1 in padding 2: whole tiles read padding only
    case(1, 4, 6, 11, 2, s=2),                            # k2 s2: row/column 10 unread (dx output_padding 1)
    case(2, 7, 5, 5, 3, p=1),                             # "same" 3x3
    case(1, 5, 7, 11, 3, p=2, d=2),                       # "same" dilated 3x3
    case(2, 3, 4, 11, 3, p=2, d=4),                       # dilation 4: border tiles skip taps
    case(1, 4, 6, 7, 5, p=2, g=2),                        # "same" 5x5, groups 2
    case(1, 3, 5, 11, 5, s=3, p=2),                       # k5 s3: remainder 1
    case(2, 4, 4, (5, 11), (1, 3), s=(1, 2), p=(0, 1), d=(1, 2)),
    case(1, 4, 4, (11, 7), (3, 2), s=(2, 3), p=(1, 2), d=(3, 1), g=2),
    case(1, 8, 8, 11, 3, s=2, p=1, d=2, g=4),             # groups 4, stride 2, remainder
    case(1, 16, 8, 5, 3, p=2, d=2, g=2),                  # 8 channels per group
    case(1, 64, 16, 5, 3, p=1, d=1),                      # 64 channels: an NCHW x is made channels_last
    case(2, 5, 5, 11, 3, p=2, d=2, g=5),                  # depthwise, multiplier 1
    case(1, 4, 8, 7, 3, s=2, p=2, d=2, g=4),              # depthwise, multiplier 2, stride 2
    case(1, 3, 6, 11, (3, 2), s=3, p=(1, 0), d=(1, 3), g=3),  # depthwise, non-square, stride 3
    case(2, 1, 3, 5, 3, p=1),                             # one input channel (the depthwise kernel)
    case(1, 3, 5, 1, 3, p=1),                             # a 1x1 image: only the centre tap
    case(1, 16, 16, 7, 3, p=2, d=(2, 3), g=16),           # depthwise, unequal dilation
]


def output_hw(c):
    return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1
                 for size, k, s, p, d in zip(c["hw"], c["k"], c["s"], c["p"], c["d"]))


def case_id(c):
    def f(v):
        return str(v[0]) if v[0] == v[1] else f"{v[0]}x{v[1]}"
    return (f"N{c['n']}-C{c['cin']}-{c['cout']}-{f(c['hw'])}-k{f(c['k'])}-s{f(c['s'])}-p{f(c['p'])}-d{f(c['d'])}"
            f"-g{c['g']}")


def depthwise(c):
    return c["cin"] == c["g"]


def conv_args(c):
    return dict(stride=list(c["s"]), padding=list(c["p"]), dilation=list(c["d"]), groups=c["g"])


def layout(t, fmt):
    """t in layout fmt: "nchw", "nhwc", or "slice" (channels 2.. of a bigger NCHW buffer filled with 7)."""
    if fmt == "nhwc":
        return t.contiguous(memory_format=torch.channels_last)
    if fmt == "slice":
        n, c, h, w = t.shape
        buf = torch.full((n, c + 5, h, w), 7.0, dtype=t.dtype)
        return buf[:, 2:2 + c].copy_(t)
    return t.contiguous()


def make(c, dtype, x_fmt="nchw", bias=True, residual=None, seed=0):
    """x, weight, bias (or None), residual (None, or in layout ``residual``) of case c."""
    gen = torch.Generator().manual_seed(seed)
    (h, w), (kh, kw) = c["hw"], c["k"]
    x = torch.randn(c["n"], c["cin"], h, w, generator=gen).to(dtype)
    wt = torch.randn(c["cout"], c["cin"] // c["g"], kh, kw, generator=gen).to(dtype)
    b = torch.randn(c["cout"], generator=gen).to(dtype) if bias else None
    r = torch.randn(c["n"], c["cout"], *output_hw(c), generator=gen).to(dtype) if residual else None
    return layout(x, x_fmt), wt, b, layout(r, residual) if residual else None


def reference(x, w, b, r, c, act, dtype):
    """act(conv2d + bias + residual) in float64, and as PyTorch computes it in ``dtype`` (None for fp32)."""
    def run(t):
        y = F.conv2d(t(x), t(w), None if b is None else t(b), **conv_args(c))
        y = y if r is None else y + t(r)
        return y if act is None else getattr(F, act)(y)
    return run(lambda t: t.double()), None if dtype == torch.float32 else run(lambda t: t)


def check(got, hi, lo, dtype, name="out"):
    assert got.dtype == dtype and got.shape == hi.shape, (got.dtype, got.shape, hi.shape)
    if dtype == torch.float32:
        assert_close(got, hi, torch.float32, rtol=1e-4, atol=1e-4, name=name)
    else:  # the low-precision rule, with the transposed convolution's atol (tests/test_conv_transpose.py)
        assert_low_precision_close(got, hi, lo, atol=1e-2, ulps=interpreter_ulps(got), name=name)


def interpreter_ulps(got) -> float:
    """2026-12: Triton 3.9's interpreter casts fp32 to bf16 by truncation (its cast_impl passes no rounding
    mode), where a GPU rounds to nearest: bf16 outputs on CPU may be off by one more ulp."""
    return 1.0 if (got.device.type, got.dtype) == ("cpu", torch.bfloat16) else 0.0


def poisoned_out(c, dtype, fmt):
    out = layout(torch.zeros(c["n"], c["cout"], *output_hw(c), dtype=dtype), fmt)
    return out.fill_(float("nan"))


def run_forward(c, dtype, x_fmt, out_fmt, act, bias, residual, kernel=None, seed=0):
    from vlfast.ops.conv2d_triton import plan_into
    x, w, b, r = make(c, dtype, x_fmt, bias, residual, seed)
    hi, lo = reference(x, w, b, r, c, act, dtype)
    out = poisoned_out(c, dtype, out_fmt)
    a = conv_args(c)
    run = plan_into(out, x, w, b, r, a["stride"], a["padding"], a["dilation"], a["groups"], ACTS.index(act),
                    kernel=kernel)
    assert run(out, x, w, b, r) is out
    check(out, hi, lo, dtype)
    if out_fmt == "slice":  # the rest of the buffer is untouched
        base = out._base
        rest = torch.cat([base[:, :2], base[:, 2 + c["cout"]:]], 1)
        assert (rest == 7).all()


# The sampled grid: per case two variants that vary dtype, layouts, bias, activation and residual; depthwise
# cases also through the GEMM kernel and in bf16 (no tl.dot: runs under the interpreter).
VARIANTS = [(i, v) for i, c in enumerate(CASES) for v in (0, 1, *((2, 3) if depthwise(c) else ()))]


def variant(i, v):
    """(dtype, x layout, out layout, activation, bias, residual layout or None, kernel)."""
    j = i + v
    dtype = (torch.float32, torch.float16)[j % 2] if v < 3 else torch.bfloat16
    x_fmt = ("nchw", "nhwc", "slice")[(i + 2 * v) % 3]
    out_fmt = ("nchw", "nhwc", "slice")[(2 * i + v) % 3]
    residual = (None, "nchw", None, "nhwc")[(i + 3 * v) % 4]
    return dtype, x_fmt, out_fmt, ACTS[j % 4], j % 3 != 2, residual, "igemm" if v == 2 else None


def variant_id(i, v):
    dtype, x_fmt, out_fmt, act, bias, residual, kernel = variant(i, v)
    return (f"{case_id(CASES[i])}-{DT[dtype]}-{x_fmt}-{out_fmt}-{act or 'id'}{'-bias' if bias else ''}"
            f"{'-res_' + residual if residual else ''}{'-' + kernel if kernel else ''}")


@pytest.mark.parametrize("i,v", VARIANTS, ids=[variant_id(i, v) for i, v in VARIANTS])
def test_forward(i, v):
    dtype, x_fmt, out_fmt, act, bias, residual, kernel = variant(i, v)
    run_forward(CASES[i], dtype, x_fmt, out_fmt, act, bias, residual, kernel, seed=i)


BACKWARD = [(i, dt) for i in range(len(CASES)) for dt in (torch.float32,) + ((torch.float16,) if i % 5 == 0 else ())]


@pytest.mark.parametrize("i,dtype", BACKWARD, ids=[f"{case_id(CASES[i])}-{DT[dt]}" for i, dt in BACKWARD])
def test_backward(i, dtype, poison_empty):
    """dx (the transposed convolution, sized to x) and dweight (split partials) against
    aten.convolution_backward in float64; x and grad in NCHW, channels_last or a channel slice."""
    from vlfast.ops.conv2d_triton import conv2d_backward
    c = CASES[i]
    x, w, _, _ = make(c, dtype, ("nchw", "nhwc", "slice")[i % 3], bias=False, seed=50 + i)
    gen = torch.Generator().manual_seed(i)
    grad = layout(torch.randn(c["n"], c["cout"], *output_hw(c), generator=gen).to(dtype),
                  ("slice", "nchw", "nhwc")[i % 3])
    a = conv_args(c)
    dx, dw = conv2d_backward(grad, x, w, a["stride"], a["padding"], a["dilation"], a["groups"], (True, True))
    geometry = (a["stride"], a["padding"], a["dilation"], False, [0, 0], a["groups"], [True, True, False])
    hi = torch.ops.aten.convolution_backward(grad.double(), x.double(), w.double(), None, *geometry)
    lo = torch.ops.aten.convolution_backward(grad, x, w, None, *geometry) if dtype != torch.float32 else (None, None)
    assert dw.is_contiguous()
    check(dx, hi[0], lo[0], dtype, "dx")
    check(dw, hi[1], lo[1], dtype, "dweight")
    only_dw = conv2d_backward(grad, x, w, a["stride"], a["padding"], a["dilation"], a["groups"], (False, True))
    assert only_dw[0] is None and torch.equal(only_dw[1], dw)  # deterministic


def test_tiles_in_padding_only():
    """1x1 taps in padding 2 on a one-row image: whole row tiles (1-D over N*OH*OW here, channels_last; 2-D in the
    grid's NCHW variants) have no tap that reaches the image and get bias + residual + activation only."""
    run_forward(CASES[1], torch.float32, "nhwc", "nhwc", "gelu", True, "nhwc", seed=11)


def test_out_aliases_residual():
    """out is the residual tensor itself: in place, no copy (each element's residual is read before it is written)."""
    from vlfast.ops.conv2d_triton import plan_into
    c = CASES[4]
    for kernel, cc in (("igemm", c), ("depthwise", CASES[13])):
        x, w, b, r = make(cc, torch.float32, "nhwc", True, "nhwc", seed=3)
        hi, _ = reference(x, w, b, r.clone(), cc, "relu", torch.float32)
        a = conv_args(cc)
        run = plan_into(r, x, w, b, r, a["stride"], a["padding"], a["dilation"], a["groups"], 2)
        ptr = r.data_ptr()
        assert run(r, x, w, b, r) is r and r.data_ptr() == ptr
        check(r, hi, None, torch.float32, kernel)


def test_out_overlaps_inputs():
    """An out sharing memory with x (two channel slices of one buffer), or overlapping the residual without being
    it: computed into a fresh tensor and copied, as out.copy_(F.conv2d(...)) would give."""
    from vlfast.ops.conv2d_triton import plan_into
    c = case(1, 4, 4, 7, 3, p=1, d=1)  # "same": out has x's size
    x0, w, b, r = make(c, torch.float32, "nchw", True, "nchw", seed=5)
    buf = torch.cat([x0, torch.zeros(1, 2, 7, 7)], 1)  # 6 channels
    x, out = buf[:, :4], buf[:, 2:6]                    # out covers x's channels 2, 3
    hi, _ = reference(x0, w, b, r, c, "silu", torch.float32)
    a = conv_args(c)
    plan_into(out, x, w, b, r, a["stride"], a["padding"], a["dilation"], a["groups"], 1)(out, x, w, b, r)
    check(out, hi, None, torch.float32)
    rbuf = torch.cat([r, torch.zeros(1, 1, 7, 7)], 1)   # out = residual's channels 1..4: overlaps, isn't it
    res, out = rbuf[:, :4], rbuf[:, 1:5]
    hi, _ = reference(x0, w, b, r, c, None, torch.float32)
    plan_into(out, x0, w, b, res, a["stride"], a["padding"], a["dilation"], a["groups"], 0)(out, x0, w, b, res)
    check(out, hi, None, torch.float32)


def test_weight_read_every_call():
    """A plan arranges the weight at each call: an in-place change of the weight between two calls shows."""
    from vlfast.ops.conv2d_triton import plan_into
    for c in (CASES[3], CASES[13]):
        x, w, b, _ = make(c, torch.float32, seed=7)
        a = conv_args(c)
        out = poisoned_out(c, torch.float32, "nchw")
        run = plan_into(out, x, w, b, None, a["stride"], a["padding"], a["dilation"], a["groups"], 0)
        run(out, x, w, b, None)
        w.data.mul_(2)
        run(out, x, w, b, None)
        check(out, reference(x, w, b, None, c, None, torch.float32)[0], None, torch.float32)


def test_empty_and_limits():
    from vlfast.ops.conv2d_triton import conv2d_backward, kernel_for, plan_into
    c = CASES[3]
    x, w, b, _ = make(c, torch.float32)
    a = conv_args(c)
    geometry = (a["stride"], a["padding"], a["dilation"], a["groups"])
    empty = torch.empty(0, 5, 5, 5)
    assert plan_into(empty, x[:0], w, b, None, *geometry, 0)(empty, x[:0], w, b, None) is empty
    dx, dw = conv2d_backward(torch.empty(0, 5, 5, 5), x[:0], w, *geometry, (True, True))
    assert dx.shape == (0, 7, 5, 5) and torch.equal(dw, torch.zeros_like(w))
    # int32 indexing: one sample of 2**31 elements (meta tensors: nothing is allocated)
    big = torch.empty(1, 2**16, 2**8, 2**7, device="meta")
    with pytest.raises(ValueError, match="2\\*\\*31"):
        plan_into(torch.empty(1, 4, 2**8, 2**7, device="meta"), big, torch.empty(4, 2**16, 1, 1, device="meta"),
                  None, None, [1, 1], [0, 0], [1, 1], 1, 0)
    assert kernel_for(1) == "depthwise" and kernel_for(2) == "igemm"
    with pytest.raises(ValueError, match="depthwise"):
        plan_into(poisoned_out(c, torch.float32, "nchw"), x, w, b, None, *geometry, 0, kernel="depthwise")
