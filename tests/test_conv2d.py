"""vlfast.ops.conv2d and vlfast.nn.Conv2d on every backend against F.conv2d in float64."""

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vlfast
from vlfast.ops.conv2d import OP, _triton_pays, conv2d
from vlfast.reference import conv2d as ref
from vlfast.testing import assert_close, assert_low_precision_close

from conftest import DT, backend_params, gpu, run_in_threads

pytestmark = pytest.mark.usefixtures("poison_empty", "no_tf32")
ACTS = [None, "relu", "silu", "gelu"]
BACKENDS = backend_params("conv2d")


@pytest.fixture
def no_tf32():
    """float32 in IEEE on both sides of each comparison."""
    cudnn = torch.backends.cudnn
    with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                     allow_tf32=False):
        yield


def case(n, cin, cout, h, w, k, s=1, p=0, d=1, g=1):
    pair = lambda v: tuple(v) if isinstance(v, tuple) else (v, v)  # noqa: E731
    return dict(n=n, cin=cin, cout=cout, h=h, w=w, k=pair(k), stride=pair(s),
                padding=p if isinstance(p, str) else pair(p), dilation=pair(d), groups=g)


# A sampled grid: kernels 1-5 and non-square, dilations 1-4 and unequal per axis, strides 1-3, paddings
# (incl. "same" with even kernels, "valid"), groups 1/2/4 and depthwise, channels 1, 3, odd and 64,
# spatial 1 and primes.
CASES = [
    case(2, 4, 6, 7, 7, 3, 1, 2, 2),                    # DeepLab-style dilation 2, "same" by hand
    case(1, 3, 5, 9, 9, 3, 1, "same", 4),               # dilation 4
    case(1, 8, 8, 5, 7, 3, 1, (2, 3), (2, 3), 8),       # depthwise, unequal dilation
    case(2, 8, 4, 7, 5, (1, 3), (2, 1), (0, 2), (1, 2), 2),  # non-square kernel, stride 2 on H only
    case(1, 64, 8, 3, 3, 3, 1, 1),                      # 64 channels: several K chunks
    case(1, 1, 1, 1, 1, 1),                             # one channel, one pixel
    case(1, 5, 3, 5, 3, 2, 1, "same", (1, 3)),          # even kernel "same": one extra column and row
    case(1, 4, 8, 7, 8, 4, 1, "same", 1, 4),            # k4 "same", groups 4
    case(2, 3, 7, 7, 5, 5, 3, "valid"),                 # k5 stride 3
    case(1, 6, 6, 5, 5, 3, 2, 1, 1, 2),                 # k3 s2 p1, groups 2
    case(1, 7, 2, 5, 9, 3, 1, 3, 3),                    # odd channels to 2, dilation 3
    case(1, 2, 4, 2, 3, 1, 1, 1),                       # 1x1 with padding: a border of bias
    case(2, 4, 4, 3, 5, 2, 2),                          # k2 s2 (patchify)
    case(1, 3, 6, 6, 6, 3, 2, 3, 3),                    # stride 2, dilation 3
    case(1, 4, 2, 9, 2, (2, 3), 1, "same", (3, 2)),     # "same": even extent 3 on H (extra row), 4 on W
]


def case_id(c):
    fmt = lambda t: t if isinstance(t, str) else str(t[0]) if t[0] == t[1] else f"{t[0]}x{t[1]}"  # noqa: E731
    return (f"N{c['n']}-Cin{c['cin']}-Cout{c['cout']}-{c['h']}x{c['w']}-k{fmt(c['k'])}-s{fmt(c['stride'])}"
            f"-p{fmt(c['padding'])}-d{fmt(c['dilation'])}-g{c['groups']}")


def conv_args(c):
    return dict(stride=c["stride"], padding=c["padding"], dilation=c["dilation"], groups=c["groups"])


def out_shape(c):
    return F.conv2d(torch.empty(c["n"], c["cin"], c["h"], c["w"], device="meta"),
                    torch.empty(c["cout"], c["cin"] // c["groups"], *c["k"], device="meta"), **conv_args(c)).shape


def make(c, dtype, device, bias=True, residual=False, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(c["n"], c["cin"], c["h"], c["w"], generator=g).to(device, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    fan = c["cin"] // c["groups"] * math.prod(c["k"])
    w = (torch.randn(c["cout"], c["cin"] // c["groups"], *c["k"], generator=g) / math.sqrt(fan)).to(device, dtype)
    b = torch.randn(c["cout"], generator=g).to(device, dtype) if bias else None
    r = torch.randn(out_shape(c), generator=g).to(device, dtype) if residual else None
    return x, w, b, r


def reference(x, w, b, r, c, activation):
    """(float64 result, the same by plain PyTorch in x's dtype)."""
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    hi = ref.conv2d(x.double(), w.double(), f64(b), **conv_args(c), activation=activation, residual=f64(r))
    lo = ref.conv2d(x, w, b, **conv_args(c), activation=activation, residual=r)
    return hi, lo


def check(got, hi, lo, dtype, name="out"):
    assert got.dtype == dtype and got.shape == hi.shape, (got.dtype, got.shape, hi.shape)
    if dtype == torch.float32:
        assert_close(got, hi, torch.float32, rtol=1e-4, atol=1e-4, name=name)
    else:
        assert_low_precision_close(got, hi, lo, atol=1e-2, name=name)


DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16", marks=gpu)]  # bf16 tl.dot is wrong under the interpreter


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("i", range(len(CASES)), ids=[case_id(c) for c in CASES])
def test_forward(device, backend, dtype, channels_last, i):
    c = CASES[i]
    # every activation, with and without bias and residual, across the grid
    activation, bias, residual = ACTS[i % 4], i % 3 != 2, i % 2 == 1
    x, w, b, r = make(c, dtype, device, bias, residual, channels_last, seed=i)
    got = conv2d(x, w, b, **conv_args(c), activation=activation, residual=r, backend=backend)
    assert vlfast.last_backend("conv2d") == backend
    hi, lo = reference(x, w, b, r, c, activation)
    check(got, hi, lo, dtype)
    if channels_last and min(got.shape[1:]) > 1 and x.shape[1] > 1:  # channels_last in, channels_last out
        assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("i", [0, 3, 6], ids=lambda i: case_id(CASES[i]))
@pytest.mark.parametrize("buffer_layout", ["nchw", "nhwc"])
def test_out_into_concat_slice(device, backend, i, buffer_layout):
    """U-Net decoder: the conv writes channels [3, 3 + Cout) of a concat buffer; the rest stays as it was."""
    c = CASES[i]
    x, w, b, r = make(c, torch.float32, device, residual=True, seed=i)
    hi, _ = reference(x, w, b, r, c, "relu")
    shape = (c["n"], c["cout"] + 5) + hi.shape[2:]
    buf = torch.arange(math.prod(shape), dtype=torch.float32).to(device).reshape(shape)
    if buffer_layout == "nhwc":
        buf = buf.to(memory_format=torch.channels_last)
    before = buf.clone()
    dst = buf[:, 3:3 + c["cout"]]
    got = conv2d(x, w, b, **conv_args(c), activation="relu", residual=r, out=dst, backend=backend)
    assert got is dst
    assert_close(buf[:, 3:3 + c["cout"]], hi, torch.float32, rtol=1e-4, atol=1e-4)
    assert torch.equal(buf[:, :3], before[:, :3]) and torch.equal(buf[:, 3 + c["cout"]:], before[:, 3 + c["cout"]:])


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_residual_updated_in_place(device, backend):
    """``out=residual``: the ResNet/U-Net skip ``h = act(conv(x) + h)`` in place, twice (the second on the
    planned path)."""
    c = CASES[0]
    x, w, b, h = make(c, torch.float32, device, residual=True)
    for _ in range(2):
        want = reference(x, w, b, h.clone(), c, "silu")[0]
        assert conv2d(x, w, b, **conv_args(c), activation="silu", residual=h, out=h, backend=backend) is h
        assert_close(h, want, torch.float32, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_unbatched_and_empty_batch(device, backend):
    c = CASES[6]  # "same" with an extra column and row
    x, w, b, r = make(c, torch.float32, device, residual=True)
    got = conv2d(x[0], w, b, **conv_args(c), activation="silu", residual=r[0], backend=backend)
    hi, _ = reference(x[:1], w, b, r[:1], c, "silu")
    assert got.shape == hi.shape[1:]
    assert_close(got, hi[0], torch.float32, rtol=1e-4, atol=1e-4)
    out = torch.empty(hi.shape[1:], device=device)
    assert conv2d(x[0], w, b, **conv_args(c), out=out, backend=backend) is out
    assert_close(out, reference(x[:1], w, b, None, c, None)[0][0], torch.float32, rtol=1e-4, atol=1e-4)
    assert conv2d(x[:0], w, b, **conv_args(c), backend=backend).shape == (0,) + hi.shape[1:]
    empty = torch.ones(0, c["cin"], 0, 0, device=device)  # what F.conv2d computes from nothing
    assert conv2d(empty, w, b, padding=2, backend=backend).shape == F.conv2d(empty, w, b, padding=2).shape


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTS, ids=str)
@pytest.mark.parametrize("i", [2, 6], ids=lambda i: case_id(CASES[i]))
def test_gradients_match_torch(device, backend, activation, i):
    """Gradients of input, weight, bias and residual (backend="triton": the Triton backward)."""
    c = CASES[i]
    leaves = [t.requires_grad_() for t in make(c, torch.float32, device, residual=True, seed=i)]
    y = conv2d(leaves[0], leaves[1], leaves[2], **conv_args(c), activation=activation, residual=leaves[3],
               backend=backend)
    assert vlfast.last_backend("conv2d", "backward") == backend
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, dy)
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    want = torch.autograd.grad(ref.conv2d(*l64[:3], **conv_args(c), activation=activation, residual=l64[3]), l64,
                               dy.double())
    for name, g, e in zip(("input", "weight", "bias", "residual"), got, want):
        assert_close(g, e, torch.float32, rtol=2e-4, atol=2e-4, name=f"grad {name}")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_forced_triton_trains_on_triton_kernels(device, backend):
    """backend="triton" runs the backward on the Triton kernels; auto keeps PyTorch's."""
    if backend != "triton":
        pytest.skip("the Triton backward")
    import vlfast.ops.conv2d_triton as c2t
    c = CASES[3]
    leaves = [t.detach().requires_grad_() for t in make(c, torch.float32, device, channels_last=True)[:3]]
    calls, real = [], c2t.conv2d_backward

    def spy(*args, **kw):
        calls.append(1)
        return real(*args, **kw)
    c2t.conv2d_backward = spy
    try:
        conv2d(*leaves, **conv_args(c), activation="silu", backend="triton").sum().backward()
        conv2d(*leaves, **conv_args(c), activation="silu").sum().backward()
    finally:
        c2t.conv2d_backward = real
    assert calls == [1]


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_gradients_through_out_and_without_bias(device, backend):
    """Recorded gradients with ``out=`` a channel slice: the forward computes into a fresh output and copies."""
    c = CASES[0]
    x, w, _, _ = (t if t is None else t.requires_grad_() for t in make(c, torch.float32, device, bias=False))
    buf = torch.zeros((c["n"], c["cout"] + 2) + out_shape(c)[2:], device=device)
    conv2d(x, w, None, **conv_args(c), activation="gelu", out=buf[:, 2:], backend=backend)
    (buf * 2).sum().backward()
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    (ref.conv2d(x64, w64, **conv_args(c), activation="gelu") * 2).sum().backward()
    assert_close(x.grad, x64.grad, torch.float32, rtol=2e-4, atol=2e-4, name="grad input")
    assert_close(w.grad, w64.grad, torch.float32, rtol=2e-4, atol=2e-4, name="grad weight")


@pytest.mark.parametrize("activation", ACTS, ids=str)
def test_gradcheck_fp64(activation):
    """The autograd formula (convolution_backward after the activation's) against finite differences, and
    double backward (the reference's gradients, recorded)."""
    g = torch.Generator().manual_seed(1)
    args = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True)
            for s in [(1, 4, 4, 3), (2, 2, 2, 2), (2,), (1, 2, 4, 3)]]

    def f(x, w, b, r):
        return conv2d(x, w, b, padding="same", dilation=(2, 1), groups=2, activation=activation, residual=r,
                      backend="reference")
    assert torch.autograd.gradcheck(f, args)
    if activation == "silu":
        assert torch.autograd.gradgradcheck(f, args)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_opcheck(device, backend):
    c = CASES[3]
    x, w, b, r = make(c, torch.float32, device, residual=True)
    geo = [list(c["stride"]), list(c["padding"]), list(c["dilation"]), c["groups"]]
    args = (x, w, b, r, *geo, 2, backend)
    torch.library.opcheck(torch.ops.vlfast.conv2d.default, args)
    nhwc = (x.to(memory_format=torch.channels_last),) + args[1:]  # the fake's strides match the kernel's
    torch.library.opcheck(torch.ops.vlfast.conv2d.default, nhwc)
    shape = out_shape(c)
    buf = torch.empty((shape[0], shape[1] + 2) + shape[2:], device=device)
    torch.library.opcheck(torch.ops.vlfast.conv2d_out.default, args + (buf[:, 2:],))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_compile_fullgraph(device, backend):
    """Both ops in one graph, "same" padding with the extra F.pad: the functional one and the write into a
    slice of a buffer."""
    c = CASES[6]
    x, w, b, r = make(c, torch.float32, device, residual=True)
    torch.use_deterministic_algorithms(False)

    def f(x):
        buf = torch.zeros(c["n"], c["cout"] + 1, c["h"], c["w"], device=device)
        y = conv2d(x, w, b, **conv_args(c), activation="relu", residual=r, backend=backend)
        conv2d(x, w, None, **conv_args(c), out=buf[:, 1:], backend=backend)
        return y, buf
    y, buf = torch.compile(f, fullgraph=True)(x)
    assert_close(y, reference(x, w, b, r, c, "relu")[0], torch.float32, rtol=1e-4, atol=1e-4)
    assert_close(buf[:, 1:], reference(x, w, None, None, c, None)[0], torch.float32, rtol=1e-4, atol=1e-4)
    assert not buf[:, 0].any()


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("unbatched", [False, True], ids=["batched", "unbatched"])
def test_out_write_bumps_its_version(device, backend, unbatched):
    c = CASES[0]
    x, w, b, _ = make(c, torch.float32, device)
    x = x[0] if unbatched else x
    buf = torch.zeros(F.conv2d(x, w, b, **conv_args(c)).shape, device=device)
    a = torch.ones_like(buf, requires_grad=True)
    y = a * buf  # saves buf for a's gradient
    conv2d(x, w, b, **conv_args(c), out=buf, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_inference_tensor_out_outside_inference_mode_is_refused():
    c = CASES[0]
    x, w, b, _ = make(c, torch.float32, "cpu")
    with torch.inference_mode():
        buf = torch.zeros(out_shape(c))
    for _ in range(2):  # the checked path, then the planned one
        with pytest.raises(RuntimeError, match="Inplace update to inference tensor"):
            conv2d(x, w, b, **conv_args(c), out=buf)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the checks read sizes: constants of the trace
def test_torch_func_and_jit_trace():
    """torch.func runs the reference; torch.jit.trace records the custom op (the "same" pad before it)."""
    from torch.func import grad, vmap
    c = CASES[6]
    x, w, b, r = make(c, torch.float32, "cpu", residual=True)
    per_sample = vmap(grad(lambda xs: conv2d(xs, w, b, **conv_args(c), activation="silu").square().sum()))(x)
    x_ = x.clone().requires_grad_()
    ref.conv2d(x_, w, b, **conv_args(c), activation="silu").square().sum().backward()
    assert_close(per_sample, x_.grad, torch.float32)
    traced = torch.jit.trace(lambda x: conv2d(x, w, b, **conv_args(c), residual=r, activation="gelu"), (x,))
    assert "vlfast::conv2d" in str(traced.graph)
    x2 = torch.randn_like(x)
    assert_close(traced(x2), reference(x2, w, b, r, c, "gelu")[0], torch.float32, rtol=1e-4, atol=1e-4)


def test_autocast_follows_pytorch():
    """Under autocast conv2d runs in the autocast dtype as aten's conv2d does; a residual in that dtype is
    fused, a wider one added after it (PyTorch's add promotes): the dtype PyTorch's composition returns."""
    c = CASES[0]
    x, w, b, r = make(c, torch.float32, "cpu", residual=True)
    for residual in (r.bfloat16(), r):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = F.relu(F.conv2d(x, w, b, **conv_args(c)) + residual)
            got = conv2d(x, w, b, **conv_args(c), residual=residual, activation="relu")
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_threads_share_the_plans():
    c = CASES[6]
    x, w, b, r = make(c, torch.float32, "cpu", residual=True)
    inputs = [torch.randn_like(x) for _ in range(4)]
    wants = [reference(xi, w, b, r, c, "relu")[0] for xi in inputs]

    def work(k):
        for _ in range(3):
            got = conv2d(inputs[k], w, b, **conv_args(c), activation="relu", residual=r)
            assert_close(got, wants[k], torch.float32, rtol=1e-4, atol=1e-4)
    errors = run_in_threads(work, 4)
    assert not errors, errors[0]


def test_triton_limits():
    """Shapes past the Triton kernels' int32 indexing or grid axis (meta tensors): not_supported_reasons says
    why (auto then takes the reference); the depthwise forward has no groups limit."""
    def inputs(x_shape, w_shape, groups=1):
        x, w = torch.empty(x_shape, device="meta"), torch.empty(w_shape, device="meta")
        return OP.check(x, w, None, 1, 1, 2, groups, None, None, None)
    assert OP.limits("triton", "forward", inputs((1, 8, 9, 9), (8, 8, 3, 3))) == []
    big = inputs((1, 64, 8192, 4200), (64, 64, 3, 3))
    assert any("int32" in r for r in OP.limits("triton", "forward", big))
    rows = inputs((300, 1, 2900, 2900), (1, 1, 3, 3))
    assert any("rows" in r for r in OP.limits("triton", "backward", rows))
    grouped = inputs((1, 2 * 70000, 3, 3), (70000, 2, 3, 3), groups=70000)
    assert any("groups" in r for r in vlfast.backends.not_supported_reasons("triton", "conv2d", grouped, "backward"))
    depthwise = inputs((1, 70000, 3, 3), (70000, 1, 3, 3), groups=70000)
    assert OP.limits("triton", "forward", depthwise) == [] and OP.limits("reference", "forward", big) == []


BAD = [
    (dict(input=torch.ones(2, 4, 5, 5, dtype=torch.int32)), TypeError, "input"),
    (dict(input=torch.ones(5, 5)), ValueError, "input"),
    (dict(weight=torch.ones(6, 3, 3, 3)), ValueError, "in_channels"),
    (dict(weight=torch.ones(6, 4, 3)), ValueError, "weight"),
    (dict(weight=torch.ones(6, 4, 3, 3, dtype=torch.float64)), TypeError, "weight"),
    (dict(groups=3), ValueError, "divisible by groups"),
    (dict(groups=2, weight=torch.ones(5, 2, 3, 3)), ValueError, "out_channels"),
    (dict(groups=0), ValueError, "groups"),
    (dict(bias=torch.ones(3)), ValueError, "bias"),
    (dict(stride=0), ValueError, "stride"),
    (dict(padding=-1), ValueError, "padding"),
    (dict(padding="full"), ValueError, "padding"),
    (dict(padding="same", stride=2), RuntimeError, "padding='same' is not supported for strided"),
    (dict(dilation=(1, 0)), ValueError, "dilation"),
    (dict(stride=(1, 2, 3)), TypeError, "stride"),
    (dict(dilation=3), ValueError, "output size"),
    (dict(weight=torch.ones(6, 4, 7, 7)), ValueError, "output size"),
    (dict(residual=torch.ones(2, 6, 5, 5)), ValueError, "residual"),
    (dict(residual=torch.ones(2, 6, 3, 3, dtype=torch.float16)), TypeError, "residual"),
    (dict(out=torch.empty(2, 6, 5, 5)), ValueError, "out"),
    (dict(out=torch.empty(2, 6, 3, 3, dtype=torch.float16)), TypeError, "out"),
    (dict(out=torch.empty(2, 6, 3, 3, device="meta")), ValueError, "out"),
    (dict(bias=torch.ones(6, device="meta")), ValueError, "bias"),
    (dict(activation="tanh"), ValueError, "activation"),
    # What F.conv2d refuses (torch 2.13): a weight with a zero dim, an input without pixels.
    (dict(weight=torch.ones(0, 4, 3, 3)), ValueError, "weight"),
    (dict(input=torch.ones(2, 0, 5, 5), weight=torch.ones(6, 0, 3, 3)), ValueError, "weight"),
    (dict(weight=torch.ones(6, 4, 0, 3)), ValueError, "weight"),
    (dict(input=torch.ones(2, 4, 0, 5), padding=2), ValueError, "input"),
    (dict(input=torch.ones(4, 5, 0), padding=2), ValueError, "input"),
    (dict(out=torch.empty(2, 1, 3, 3).expand(2, 6, 3, 3)), RuntimeError, "more than one element of the written-to"),
]


@pytest.mark.parametrize("backend", ["reference", "triton", None], ids=["reference", "triton", "auto"])
@pytest.mark.parametrize("bad,exc,word", BAD, ids=[f"{w.split()[0]}-{i}" for i, (_, _, w) in enumerate(BAD)])
def test_bad_input(bad, exc, word, backend):
    args = dict(input=torch.ones(2, 4, 5, 5), weight=torch.ones(6, 4, 3, 3))
    args.update(bad)
    with pytest.raises(exc, match=word):
        conv2d(args.pop("input"), args.pop("weight"), **args, backend=backend)


def test_auto_order_on_cuda_predicts_the_targeted_cases():
    """On CUDA auto puts Triton first for dilated 16-bit convolutions with a channels_last input, an out
    buffer or a residual (unmeasured: a prediction); elsewhere, and for the backward, the reference."""
    def inputs(dtype=torch.float16, dilation=2, channels_last=True, out=False, residual=False):
        x = torch.randn(1, 4, 9, 9, dtype=dtype)
        x = x.to(memory_format=torch.channels_last) if channels_last else x
        w, shape = torch.randn(4, 4, 3, 3, dtype=dtype), (1, 4, 9, 9)
        extra = dict(out=torch.empty(shape, dtype=dtype) if out else None,
                     residual=torch.empty(shape, dtype=dtype) if residual else None)
        return OP.check(x, w, None, 1, dilation, dilation, 1, None, extra["residual"], extra["out"])
    assert _triton_pays(inputs()) and _triton_pays(inputs(torch.bfloat16))
    assert _triton_pays(inputs(channels_last=False, out=True)) and _triton_pays(inputs(channels_last=False,
                                                                                       residual=True))
    assert not _triton_pays(inputs(channels_last=False))
    assert not _triton_pays(inputs(torch.float32)) and not _triton_pays(inputs(dilation=1))
    cuda = inputs()._replace(device=torch.device("cuda"))
    assert OP.order("forward", cuda) == ("triton", "reference") and OP.order("backward", cuda) == ("reference",)
    assert OP.order("forward", inputs(dilation=1)._replace(device=torch.device("cuda"))) == ("reference",)
    assert OP.order("forward", inputs()) is None  # CPU: the device's default, the reference (oneDNN)


# ---------------------------------------------------------------- the module and convert()
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", [2, "same", (1, 3)], ids=["p2", "same", "p1x3"])
def test_module_matches_nn_conv2d(padding_mode, padding):
    torch.manual_seed(0)
    theirs = nn.Conv2d(4, 6, (2, 3), padding=padding, dilation=(2, 1), groups=2, padding_mode=padding_mode)
    ours = vlfast.nn.Conv2d(4, 6, (2, 3), padding=padding, dilation=(2, 1), groups=2, padding_mode=padding_mode,
                            activation="relu")
    ours.load_state_dict(theirs.state_dict())
    assert isinstance(ours, nn.Conv2d) and ours.state_dict().keys() == theirs.state_dict().keys()
    assert "relu" in repr(ours) and "activation" not in repr(vlfast.nn.Conv2d(4, 6, 3))
    x = torch.randn(2, 4, 6, 7, requires_grad=True)
    want = theirs(x)
    r = torch.randn_like(want)
    got = ours(x, r)
    assert_close(got, F.relu(want + r), torch.float32, rtol=1e-5, atol=1e-5)
    assert_close(ours(x[0]), F.relu(theirs(x[0])), torch.float32, rtol=1e-5, atol=1e-5)
    buf = torch.zeros(2, 8, *want.shape[2:])
    assert ours(x, out=buf[:, 2:]) is not None
    assert_close(buf[:, 2:], F.relu(want), torch.float32, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(want)
    mine = torch.autograd.grad(ours(x), (x, *ours.parameters()), g)
    base = torch.autograd.grad(F.relu(theirs(x)), (x, *theirs.parameters()), g)
    for a, b in zip(mine, base):
        assert_close(a, b, torch.float32, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="activation"):
        vlfast.nn.Conv2d(4, 6, 3, activation="tanh")


# PyTorch's own nn.Conv2d samples run with the other drop-ins' in tests/test_dropin.py (test_module_db_samples).


def test_constructor_takes_the_installed_torchs_arguments():
    import inspect
    assert list(inspect.signature(vlfast.nn.Conv2d.__init__).parameters) == \
        list(inspect.signature(nn.Conv2d.__init__).parameters) + ["activation"]
    assert vlfast.nn.Conv2d(4, 2, 3, bias=False, padding_mode="reflect", dtype=torch.float64).weight.dtype \
        == torch.float64


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=2, dilation=2), nn.SiLU(),
                         nn.Sequential(nn.Conv2d(4, 4, 3, padding="same", dilation=(1, 3)), nn.GELU()),
                         nn.ConvTranspose2d(4, 2, 2, stride=2))


@pytest.mark.parametrize("mode", ["dilated", "all", "none", None])
def test_convert_modes(mode):
    """"dilated" (the default) switches the dilated nn.Conv2d only, "all" every one, "none" none; each fuses
    the following activation where it switched (the slot becomes an nn.Identity)."""
    model = _model()
    x = torch.randn(2, 3, 6, 5)
    want = model(x)
    convs = [model[0], model[2], model[4][0]]
    vlfast.nn.convert(model) if mode is None else vlfast.nn.convert(model, conv2d=mode)
    mode = mode or "dilated"
    switched = {"dilated": [False, True, True], "all": [True, True, True], "none": [False, False, False]}[mode]
    for conv, act, on in zip(convs, ["relu", "silu", "gelu"], switched):
        assert (type(conv) is vlfast.nn.Conv2d) == on and (getattr(conv, "activation", None) == act) == on
    assert [type(model[i]) for i in (1, 3)] == [nn.Identity if on else a for on, a in zip(switched, (nn.ReLU, nn.SiLU))]
    assert type(model[4][1]) is (nn.GELU if mode == "none" else nn.Identity)
    assert type(model[5]) is vlfast.nn.ConvTranspose2d and model[0] is convs[0]
    assert_close(model(x), want, torch.float32, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="conv2d"):
        vlfast.nn.convert(model, conv2d="dilation")


def test_convert_fuses_only_where_nothing_can_tell():
    """No fusion where the conv is used twice, where either module has a hook, where the conv already has
    an activation, for GELU's tanh form, or in a Sequential subclass with a forward of its own."""
    class Twice(nn.Sequential):
        def forward(self, x):
            return self[1](self[0](x)) + self[0](x)

    shared = nn.Conv2d(4, 4, 3, padding=2, dilation=2)
    hooked, hooked_act = nn.Conv2d(4, 4, 3, padding=2, dilation=2), nn.ReLU()
    hooked.register_forward_hook(lambda m, a, y: None)
    hooked_act.register_forward_pre_hook(lambda m, a: None)
    plain_hooked = nn.Conv2d(4, 4, 3, padding=2, dilation=2)
    done = vlfast.nn.Conv2d(4, 4, 3, padding=2, dilation=2, activation="silu")
    model = nn.Sequential(shared, nn.ReLU(), shared, hooked, nn.ReLU(), plain_hooked, hooked_act, done, nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=2, dilation=2), nn.GELU(approximate="tanh"),
                          Twice(nn.Conv2d(4, 4, 3, padding=2, dilation=2), nn.ReLU()))
    x = torch.randn(1, 4, 5, 5)
    want = model(x)
    vlfast.nn.convert(model)
    assert all(type(m) is not nn.Identity for m in model.modules())
    assert type(shared) is vlfast.nn.Conv2d and shared.activation is None and done.activation == "silu"
    assert_close(model(x), want, torch.float32, rtol=1e-5, atol=1e-5)
    fused = nn.Sequential(nn.Conv2d(4, 4, 3, padding=2, dilation=2), nn.ReLU(inplace=True)).eval()
    want = fused(x)
    vlfast.nn.convert(fused)
    assert fused[0].activation == "relu" and type(fused[1]) is nn.Identity and not fused[1].training
    assert_close(fused(x), want, torch.float32, rtol=1e-5, atol=1e-5)


def test_convert_keeps_parametrized_convs_and_warns_for_subclasses():
    class MyConv(nn.Conv2d):
        pass

    pz = nn.Conv2d(4, 4, 3, padding=2, dilation=2)
    torch.nn.utils.parametrize.register_parametrization(pz, "weight", nn.Tanh())
    model = nn.Sequential(pz, MyConv(4, 4, 3, padding=2, dilation=2), MyConv(4, 4, 3, padding=1))
    x = torch.randn(1, 4, 5, 5)
    want = model(x)
    with pytest.warns(UserWarning, match="MyConv") as record:
        vlfast.nn.convert(model)
    assert len(record) == 1  # the undilated subclass is not selected: no warning
    assert isinstance(pz, vlfast.nn.Conv2d) and torch.nn.utils.parametrize.is_parametrized(pz, "weight")
    assert type(model[1]) is MyConv
    assert_close(model(x), want, torch.float32, rtol=1e-5, atol=1e-5)


def test_module_exports_and_saves():
    layer = vlfast.nn.Conv2d(3, 4, 2, padding="same", dilation=3, activation="silu").eval()
    x = torch.randn(1, 3, 7, 6)
    program = torch.export.export(layer, (x,))
    assert "vlfast." in str(program.graph)
    buf = io.BytesIO()
    torch.export.save(program, buf)
    buf.seek(0)
    x2 = torch.randn_like(x)
    assert_close(torch.export.load(buf).module()(x2), layer(x2), torch.float32)


# ---------------------------------------------------------------- GPU only
GPU_CASES = [case(2, 64, 64, 33, 33, 3, 1, 2, 2), case(1, 128, 128, 17, 17, 3, 1, "same", 4),
             case(2, 96, 96, 15, 15, 3, 1, 3, 3, 96), case(1, 32, 48, 16, 16, 4, 1, "same", (2, 3))]


@gpu
@pytest.mark.parametrize("dtype", list(DT), ids=DT.get)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("i", range(len(GPU_CASES)), ids=[case_id(c) for c in GPU_CASES])
def test_forward_cuda_shapes(dtype, channels_last, i):
    c = GPU_CASES[i]
    x, w, b, r = make(c, dtype, "cuda", residual=True, channels_last=channels_last, seed=i)
    got = conv2d(x, w, b, **conv_args(c), activation="silu", residual=r, backend="triton")
    hi, lo = reference(x, w, b, r, c, "silu")
    check(got, hi, lo, dtype)
