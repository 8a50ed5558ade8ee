"""vlfast.ops.conv_transpose2d and vlfast.nn.ConvTranspose2d on every backend against F.conv_transpose2d in float64."""

import contextlib
import functools
import math

import pytest
import torch
import torch.nn.functional as F

import vlfast
from vlfast.ops.conv_transpose import conv_transpose2d
from vlfast.ops.conv_transpose_triton import precision
from vlfast.reference import conv_transpose as ref
from vlfast.testing import assert_close, assert_low_precision_close

from conftest import DT, backend_params, gpu

pytestmark = pytest.mark.usefixtures("poison_empty", "no_tf32")
ACTS = [None, "relu", "silu", "gelu"]


@contextlib.contextmanager
def tf32_settings_restored():
    """Inside: change any of PyTorch's TF32 settings; after: the legacy cuDNN flag's value from before, and
    the newer fp32_precision settings (torch >= 2.9) back to what that flag gives (conv and RNN set by the
    flag, the levels above them "none")."""
    old = torch.backends.cudnn.allow_tf32
    try:
        yield
    finally:
        if hasattr(torch.backends, "fp32_precision"):
            for scope in (torch.backends, torch.backends.cudnn, torch.backends.cudnn.conv, torch.backends.cudnn.rnn):
                scope.fp32_precision = "none"
        torch.backends.cudnn.allow_tf32 = old


@pytest.fixture
def no_tf32():
    """float32 in IEEE everywhere (the kernel follows PyTorch's cuDNN TF32 setting, as torch's own reference
    does)."""
    with tf32_settings_restored():
        torch.backends.cudnn.allow_tf32 = False
        yield


def case(n, cin, cout, h, w, k, s=1, p=0, op=0, d=1, g=1):
    pair = lambda v: tuple(v) if isinstance(v, tuple) else (v, v)  # noqa: E731
    return dict(n=n, cin=cin, cout=cout, h=h, w=w, k=pair(k), stride=pair(s), padding=pair(p),
                output_padding=pair(op), dilation=pair(d), groups=g)


# A sampled grid: kernel sizes 1-5, 2x2/4x4, strides 1-4, paddings, output_paddings, dilations 1-3,
# groups 1/2/4, channels 1, 3, odd and 64, spatial 1 and primes, batch 1 and odd.
CASES = [
    case(2, 8, 6, 5, 3, 2, 2),                          # U-Net up-conv (k == s: the GEMM path)
    case(1, 4, 6, 3, 4, 2, 2, op=1, g=2),               # k == s with output_padding and groups
    case(1, 3, 5, 2, 3, 4, 4),                          # 4x4 stride 4
    case(2, 8, 12, 3, 3, 2, 2, g=4),
    case(1, 64, 64, 3, 2, 2, 2),                        # 64 channels: several K chunks
    case(3, 5, 7, 5, 5, 4, 2, 1),                       # VAE decoder k4 s2 p1
    case(2, 6, 4, 4, 3, 3, 2, 1, 1),                    # k3 s2 p1 op1
    case(1, 3, 3, 7, 7, 1),                             # 1x1
    case(1, 2, 3, 3, 2, 1, 3, op=2),                    # k < s: phases without taps get bias only
    case(1, 4, 4, 5, 5, 5, 1, 2),                       # k5 s1 p2: an ordinary "same" convolution
    case(2, 3, 5, 7, 5, 3, 1, 2, d=2),                  # dilation 2
    case(1, 8, 8, 5, 3, 3, 2, 1, 2, 3, 4),              # dilation 3, output_padding 2 < dilation, groups 4
    case(1, 4, 2, 3, 5, (5, 2), (4, 3), (3, 0), (1, 2), (2, 1), 2),  # asymmetric everything
    case(3, 5, 4, 1, 1, 3, 2, op=1),                    # 1x1 input
    case(1, 1, 1, 1, 1, 2, 2),                          # one channel, one pixel
    case(1, 3, 3, 7, 5, 3, 1, 3),                       # padding larger than the kernel reach: output 3x1
    case(2, 3, 2, 5, 7, (4, 2), (3, 1), (2, 1), (1, 0)),
    case(1, 17, 3, 11, 13, 4, 2, 1),                    # odd channels to 3 (to-RGB), prime spatial
    case(1, 3, 4, 4, 4, 2, 3, d=3),                     # gcd(s, d) = s: both taps in one phase
    case(1, 2, 3, 3, 3, 3, 4, 1, 3, 2),                 # stride 4, dilation 2: two taps in phase 0, one in 2
    case(1, 64, 16, 2, 3, 3, 2, 1),
    case(1, 3, 4, 2, 71, 2, 2),                         # wider than a tile of cells: several tiles per row
    case(1, 5, 2, 3, 67, 4, 2, 1, g=1),                 # the same with two taps and a cropped border
]


def case_id(c):
    fmt = lambda t: str(t[0]) if t[0] == t[1] else f"{t[0]}x{t[1]}"  # noqa: E731
    return (f"N{c['n']}-Cin{c['cin']}-Cout{c['cout']}-{c['h']}x{c['w']}-k{fmt(c['k'])}-s{fmt(c['stride'])}"
            f"-p{fmt(c['padding'])}-op{fmt(c['output_padding'])}-d{fmt(c['dilation'])}-g{c['groups']}")


def conv_args(c):
    return dict(stride=c["stride"], padding=c["padding"], output_padding=c["output_padding"], groups=c["groups"],
                dilation=c["dilation"])


def make(c, dtype, device, bias=True, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(c["n"], c["cin"], c["h"], c["w"], generator=g).to(device, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    fan = c["cin"] // c["groups"] * math.prod(c["k"])
    w = (torch.randn(c["cin"], c["cout"] // c["groups"], *c["k"], generator=g) / math.sqrt(fan)).to(device, dtype)
    b = torch.randn(c["cout"], generator=g).to(device, dtype) if bias else None
    return x, w, b


def reference(x, w, b, c, activation, dtype):
    """(float64 result, the same by plain PyTorch in ``dtype``)."""
    hi = ref.conv_transpose2d(x.double(), w.double(), None if b is None else b.double(), **conv_args(c),
                              activation=activation)
    lo = ref.conv_transpose2d(x, w, b, **conv_args(c), activation=activation)
    return hi, lo


def check(got, hi, lo, dtype, name="out"):
    assert got.dtype == dtype and got.shape == hi.shape, (got.dtype, got.shape, hi.shape)
    if dtype == torch.float32:
        assert_close(got, hi, torch.float32, rtol=1e-4, atol=1e-4, name=name)
    else:
        assert_low_precision_close(got, hi, lo, atol=1e-2, name=name)


def skip_unsupported(device, backend, dtype):
    if dtype == torch.bfloat16 and device == "cpu" and backend == "triton":
        pytest.skip("bf16 tl.dot returns garbage under Triton 3.9's interpreter: bf16 is tested on a GPU")
    if dtype == torch.float16 and device == "cuda":
        pytest.skip("fp16 on a GPU: test_forward_cuda_shapes (each case here is one more kernel compile)")


@pytest.mark.parametrize("device,backend", backend_params("conv_transpose2d"))
@pytest.mark.parametrize("dtype", list(DT), ids=DT.get)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("i", range(len(CASES)), ids=[case_id(c) for c in CASES])
def test_forward(device, backend, dtype, channels_last, i):
    skip_unsupported(device, backend, dtype)
    c = CASES[i]
    activation, bias = ACTS[i % 4], i % 3 != 2  # every activation, with and without bias, across the grid
    x, w, b = make(c, dtype, device, bias, channels_last, seed=i)
    got = conv_transpose2d(x, w, b, **conv_args(c), activation=activation, backend=backend)
    assert vlfast.last_backend("conv_transpose2d") == backend
    hi, lo = reference(x, w, b, c, activation, dtype)
    check(got, hi, lo, dtype)
    if channels_last and x.shape[1] > 1 and x.shape[2] * x.shape[3] > 1 and got.shape[1] > 1:
        assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device,backend", backend_params("conv_transpose2d"))
def test_forced_triton_trains_on_triton_kernels(device, backend):
    """backend="triton" runs the backward on the Triton kernels too (dilation 1); auto keeps PyTorch's."""
    if backend != "triton":
        pytest.skip("the Triton backward")
    c = CASES[5]
    x, w, b = make(c, torch.float32, device, channels_last=True)
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    calls = []
    import vlfast.ops.conv_transpose_triton as ctt
    real = ctt.conv_transpose2d_backward

    def spy(*args, **kw):
        calls.append(1)
        return real(*args, **kw)
    ctt.conv_transpose2d_backward = spy
    try:
        y = conv_transpose2d(*leaves, **conv_args(c), activation="silu", backend="triton")
        y.backward(torch.ones_like(y))
    finally:
        ctt.conv_transpose2d_backward = real
    assert calls == [1]
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref.conv_transpose2d(*ref_leaves, **conv_args(c), activation="silu").backward(
        torch.ones(y.shape, dtype=torch.float64))
    for got, want in zip(leaves, ref_leaves):
        assert_close(got.grad, want.grad, torch.float32, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device,backend", backend_params("conv_transpose2d"))
@pytest.mark.parametrize("i", [0, 1, 6, 12], ids=lambda i: case_id(CASES[i]))
@pytest.mark.parametrize("buffer_layout", ["nchw", "nhwc"])
def test_out_into_concat_slice(device, backend, i, buffer_layout):
    """U-Net decoder: the up-conv writes channels [3, 3 + Cout) of a concat buffer; the rest stays as it was."""
    c = CASES[i]
    x, w, b = make(c, torch.float32, device, seed=i)
    hi, _ = reference(x, w, b, c, "relu", torch.float32)
    buf = torch.arange(math.prod((c["n"], c["cout"] + 5) + hi.shape[2:]), dtype=torch.float32).to(device)
    buf = buf.reshape((c["n"], c["cout"] + 5) + hi.shape[2:])
    if buffer_layout == "nhwc":
        buf = buf.to(memory_format=torch.channels_last)
    before = buf.clone()
    dst = buf[:, 3:3 + c["cout"]]
    got = conv_transpose2d(x, w, b, **conv_args(c), activation="relu", out=dst, backend=backend)
    assert got is dst
    assert_close(buf[:, 3:3 + c["cout"]], hi, torch.float32, rtol=1e-4, atol=1e-4)
    assert torch.equal(buf[:, :3], before[:, :3]) and torch.equal(buf[:, 3 + c["cout"]:], before[:, 3 + c["cout"]:])


@pytest.mark.parametrize("device,backend", backend_params("conv_transpose2d"))
def test_unbatched_and_empty_batch(device, backend):
    c = CASES[6]
    x, w, b = make(c, torch.float32, device)
    got = conv_transpose2d(x[0], w, b, **conv_args(c), activation="silu", backend=backend)
    hi, _ = reference(x[:1], w, b, c, "silu", torch.float32)
    assert got.shape == hi.shape[1:]
    assert_close(got, hi[0], torch.float32, rtol=1e-4, atol=1e-4)
    out = torch.empty(hi.shape[1:], device=device)
    assert conv_transpose2d(x[0], w, b, **conv_args(c), out=out, backend=backend) is out
    assert_close(out, reference(x[:1], w, b, c, None, torch.float32)[0][0], torch.float32, rtol=1e-4, atol=1e-4)
    empty = conv_transpose2d(x[:0], w, b, **conv_args(c), backend=backend)
    assert empty.shape == (0,) + hi.shape[1:]


@pytest.mark.parametrize("device,backend", backend_params("conv_transpose2d"))
@pytest.mark.parametrize("activation", ACTS, ids=str)
@pytest.mark.parametrize("i", [0, 5, 11], ids=lambda i: case_id(CASES[i]))
def test_gradients_match_torch(device, backend, activation, i):
    c = CASES[i]
    x, w, b = (t.requires_grad_() for t in make(c, torch.float32, device, seed=i))
    y = conv_transpose2d(x, w, b, **conv_args(c), activation=activation, backend=backend)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, b), dy)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    want = torch.autograd.grad(ref.conv_transpose2d(*leaves, **conv_args(c), activation=activation), leaves,
                               dy.double())
    for name, g, e in zip(("input", "weight", "bias"), got, want):
        assert_close(g, e, torch.float32, rtol=2e-4, atol=2e-4, name=f"grad {name}")


@pytest.mark.parametrize("device,backend", backend_params("conv_transpose2d"))
@pytest.mark.parametrize("i", [1, 0], ids=lambda i: case_id(CASES[i]))
def test_gradients_through_out_and_without_bias(device, backend, i):
    """Recorded gradients with ``out=`` a channel slice: the forward computes into a fresh output (with a
    batch of 2, the slice's batch stride differs from the fresh output's) and copies."""
    c = CASES[i]
    x, w, _ = (t.requires_grad_() if t is not None else t for t in make(c, torch.float32, device, bias=False))
    shape = F.conv_transpose2d(x, w, **conv_args(c)).shape
    buf = torch.zeros((c["n"], c["cout"] + 2) + shape[2:], device=device)
    conv_transpose2d(x, w, None, **conv_args(c), activation="gelu", out=buf[:, 2:], backend=backend)
    (buf * 2).sum().backward()
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    (ref.conv_transpose2d(x64, w64, **conv_args(c), activation="gelu") * 2).sum().backward()
    assert_close(x.grad, x64.grad, torch.float32, rtol=2e-4, atol=2e-4, name="grad input")
    assert_close(w.grad, w64.grad, torch.float32, rtol=2e-4, atol=2e-4, name="grad weight")


@pytest.mark.parametrize("activation", ACTS, ids=str)
def test_gradcheck_fp64(activation):
    """The autograd formula (torch's convolution_backward after the activation's) against finite differences."""
    g = torch.Generator().manual_seed(1)
    args = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True)
            for s in [(1, 4, 3, 2), (4, 1, 3, 2), (2,)]]

    def f(x, w, b):
        return conv_transpose2d(x, w, b, stride=(2, 1), padding=(1, 0), output_padding=(1, 0), groups=2,
                                dilation=(1, 2), activation=activation, backend="reference")
    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("device,backend", backend_params("conv_transpose2d"))
def test_opcheck(device, backend):
    c = CASES[12]
    x, w, b = make(c, torch.float32, device)
    geo = [list(c["stride"]), list(c["padding"]), list(c["output_padding"]), c["groups"], list(c["dilation"])]
    args = (x, w, b, *geo[:3], geo[3], geo[4], 1, backend)
    torch.library.opcheck(torch.ops.vlfast.conv_transpose2d.default, args)
    nhwc = (x.to(memory_format=torch.channels_last),) + args[1:]  # the fake's strides match the kernel's
    torch.library.opcheck(torch.ops.vlfast.conv_transpose2d.default, nhwc)
    shape = F.conv_transpose2d(x, w, b, **conv_args(c)).shape
    buf = torch.empty((shape[0], shape[1] + 2) + shape[2:], device=device)
    torch.library.opcheck(torch.ops.vlfast.conv_transpose2d_out.default, args + (buf[:, 2:],))


@pytest.mark.parametrize("device,backend", backend_params("conv_transpose2d"))
def test_compile_fullgraph(device, backend):
    """Both ops in one graph: the functional one and the write into a slice of a buffer."""
    c = CASES[0]
    x, w, b = make(c, torch.float32, device)
    torch.use_deterministic_algorithms(False)

    def f(x):
        buf = torch.zeros(c["n"], c["cout"] + 1, 2 * c["h"], 2 * c["w"], device=device)
        conv_transpose2d(x, w, b, **conv_args(c), activation="silu", out=buf[:, 1:], backend=backend)
        return conv_transpose2d(x, w, b, **conv_args(c), backend=backend) * 2, buf

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(x), f(x)):
        assert_close(got, want, torch.float32)


def test_auto_falls_back_and_forced_backend_explains():
    x, w, _ = make(CASES[0], torch.float64, "cpu")
    conv_transpose2d(x, w, stride=2)
    assert vlfast.last_backend("conv_transpose2d") == "reference"
    with pytest.raises(RuntimeError, match="float64"):
        conv_transpose2d(x, w, stride=2, backend="triton")


def _set_tf32(**levels):
    """Set PyTorch's TF32 settings: ``legacy`` the cuDNN flag; generic, cudnn, conv the fp32_precision of
    torch.backends, torch.backends.cudnn and torch.backends.cudnn.conv."""
    scopes = dict(generic=torch.backends, cudnn=torch.backends.cudnn,
                  conv=getattr(torch.backends.cudnn, "conv", None))
    for name, value in levels.items():
        if name == "legacy":
            torch.backends.cudnn.allow_tf32 = value
        else:
            scopes[name].fp32_precision = value


# (settings, what a float32 CUDA convolution then uses): the legacy flag, then the newer per-op setting and
# its "none" inheriting from the levels above it (torch >= 2.9).
TF32_SEQUENCE = [(dict(legacy=True), "tf32"), (dict(legacy=False), "ieee"),
                 (dict(conv="tf32"), "tf32"), (dict(conv="ieee"), "ieee"),
                 (dict(conv="none", cudnn="tf32"), "tf32"), (dict(cudnn="none", generic="ieee"), "ieee"),
                 (dict(generic="tf32"), "tf32"), (dict(generic="none"), "ieee")]
TF32_SETTINGS = [functools.partial(_set_tf32, **levels) for levels, _ in TF32_SEQUENCE
                 if "legacy" in levels or hasattr(torch.backends, "fp32_precision")]


def test_tf32_follows_pytorch_settings():
    """The TF32 decision follows PyTorch's settings for cuDNN convolutions as the installed torch keeps them
    (reading the legacy flag after setting conv and RNN differently raises in torch >= 2.9)."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    with tf32_settings_restored():
        for setting, (levels, want) in zip(TF32_SETTINGS, TF32_SEQUENCE):
            setting()
            assert precision(torch.float32, cuda) == want, levels
            assert precision(torch.float32, cpu) == "ieee" and precision(torch.bfloat16, cuda) == "tf32"


@pytest.mark.parametrize("device,backend", backend_params("conv_transpose2d"))
def test_weight_updated_in_place_is_seen(device, backend):
    """An in-place update of the weight is seen at the next call (writes through ``.data``:
    test_conv_transpose_triton.py)."""
    c = CASES[5]
    x, w, b = make(c, torch.float32, device)
    conv_transpose2d(x, w, b, **conv_args(c), backend=backend)
    w.mul_(-2)
    got = conv_transpose2d(x, w, b, **conv_args(c), backend=backend)
    assert_close(got, reference(x, w, b, c, None, torch.float32)[0], torch.float32, rtol=1e-4, atol=1e-4)


BAD = [
    (dict(input=torch.ones(2, 4, 3, 3, dtype=torch.int32)), TypeError, "input"),
    (dict(input=torch.ones(4, 3)), ValueError, "input"),
    (dict(weight=torch.ones(3, 2, 2, 2)), ValueError, "in_channels"),
    (dict(weight=torch.ones(4, 2, 2)), ValueError, "weight"),
    (dict(weight=torch.ones(4, 2, 2, 2, dtype=torch.float64)), TypeError, "weight"),
    (dict(groups=3), ValueError, "divisible by groups"),
    (dict(groups=0), ValueError, "groups"),
    (dict(bias=torch.ones(3)), ValueError, "bias"),
    (dict(stride=0), ValueError, "stride"),
    (dict(padding=-1), ValueError, "padding"),
    (dict(dilation=(1, 0)), ValueError, "dilation"),
    (dict(output_padding=2), ValueError, "smaller than either stride or dilation"),
    (dict(output_padding=1, stride=1), ValueError, "output_padding"),
    (dict(stride=(1, 2, 3)), TypeError, "stride"),
    (dict(padding=5), ValueError, "output size"),
    (dict(out=torch.empty(2, 2, 6, 6)), ValueError, "out"),
    (dict(out=torch.empty(2, 2, 7, 7, dtype=torch.float16)), TypeError, "out"),
    (dict(out=torch.empty(2, 2, 7, 7, device="meta")), ValueError, "out"),
    (dict(bias=torch.ones(2, device="meta")), ValueError, "bias"),
    (dict(activation="tanh"), ValueError, "activation"),
    # What F.conv_transpose2d refuses (torch 2.13): a weight with a zero dim, an input without pixels.
    (dict(input=torch.ones(2, 0, 3, 3), weight=torch.ones(0, 2, 3, 3)), ValueError, "weight"),
    (dict(weight=torch.ones(4, 0, 3, 3)), ValueError, "weight"),
    (dict(weight=torch.ones(4, 2, 0, 0)), ValueError, "weight"),
    (dict(weight=torch.ones(4, 2, 3, 0), input=torch.ones(0, 4, 3, 3)), ValueError, "weight"),
    (dict(input=torch.ones(2, 4, 0, 3)), ValueError, "input"),
    (dict(input=torch.ones(4, 3, 0)), ValueError, "input"),
    (dict(out=torch.empty(2, 1, 7, 7).expand(2, 2, 7, 7)), RuntimeError, "more than one element of the written-to"),
]


@pytest.mark.parametrize("backend", ["reference", "triton", None], ids=["reference", "triton", "auto"])
@pytest.mark.parametrize("bad,exc,word", BAD, ids=[f"{w.split()[0]}-{i}" for i, (_, _, w) in enumerate(BAD)])
def test_bad_input(bad, exc, word, backend):
    args = dict(input=torch.ones(2, 4, 3, 3), weight=torch.ones(4, 2, 3, 3), stride=2)
    args.update(bad)
    with pytest.raises(exc, match=word):
        conv_transpose2d(args.pop("input"), args.pop("weight"), **args, backend=backend)


@pytest.mark.parametrize("device,backend", backend_params("conv_transpose2d"))
def test_empty_batch_without_pixels_computes(device, backend):
    """What F.conv_transpose2d computes from nothing (an empty batch, even of 0x0 images), every backend does."""
    w, b = torch.randn(4, 3, 3, 3, device=device), torch.randn(3, device=device)
    for x in (torch.ones(0, 4, 0, 0, device=device), torch.ones(0, 4, 2, 3, device=device)):
        want = F.conv_transpose2d(x, w, b, stride=2)
        got = conv_transpose2d(x, w, b, stride=2, backend=backend)
        assert got.shape == want.shape


@pytest.mark.parametrize("device,backend", backend_params("conv_transpose2d"))
@pytest.mark.parametrize("unbatched", [False, True], ids=["batched", "unbatched"])
def test_out_write_bumps_its_version(device, backend, unbatched):
    """A write into ``out`` counts as an in-place change: a backward that saved out's old values raises as
    PyTorch's does, instead of using the new ones."""
    c = CASES[5]
    x, w, b = make(c, torch.float32, device)
    x = x[0] if unbatched else x
    buf = torch.zeros(F.conv_transpose2d(x, w, b, **conv_args(c)).shape, device=device)
    a = torch.ones_like(buf, requires_grad=True)
    y = a * buf  # saves buf for a's gradient
    conv_transpose2d(x, w, b, **conv_args(c), out=buf, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def _sharing(c, which, channels_last, device):
    """(x, w, b, out, copies of x, w, b) of case c, where ``which`` (input, weight or bias) starts at out's
    first element (x in out's layout: x is out itself where they have one shape)."""
    x, w, b = make(c, torch.float32, device, channels_last=channels_last, seed=5)
    shape = F.conv_transpose2d(x, w, b, **conv_args(c)).shape
    memory = torch.randn(math.prod(shape) + x.numel() + w.numel(), device=device)

    def view(t):  # t's shape at the start of memory, channels_last where asked
        if channels_last and t.dim() == 4:
            n, ch, h, wd = t.shape
            return memory[:t.numel()].view(n, h, wd, ch).permute(0, 3, 1, 2)
        return memory[:t.numel()].view(t.shape)
    out = view(torch.empty(shape))
    if which == "input":
        x = view(x).copy_(x)
    elif which == "weight":
        w = view(w).copy_(w)
    else:
        b = view(b).copy_(b)
    return x, w, b, out, (x.clone(), w.clone(), b.clone())


@pytest.mark.parametrize("device,backend", backend_params("conv_transpose2d"))
@pytest.mark.parametrize("kernel", ["subpixel", "phase"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("which", ["input", "weight", "bias"])
def test_out_sharing_memory_with_an_input(device, backend, kernel, channels_last, which):
    """``out`` that is (or overlaps) the input, the weight or the bias gets the result of
    ``out.copy_(F.conv_transpose2d(...))``, twice in a row (the second on the planned path)."""
    from vlfast.ops import _overrides
    if backend == "reference" and kernel == "phase":
        pytest.skip("the knob picks a Triton kernel")
    # 1x1 stride 1 with Cin == Cout (out can be x itself; 33 channels: two column tiles), and k4 s2 p1
    for c, calls in ((case(1, 33, 33, 3, 2, 1), 2), (case(1, 4, 3, 4, 5, 4, 2, 1), 1)):
        for _ in range(calls):
            x, w, b, out, copies = _sharing(c, which, channels_last, device)
            want = reference(*copies, c, None, torch.float32)[0]
            with _overrides.use(conv_transpose_kernel=kernel if backend == "triton" else None):
                got = conv_transpose2d(x, w, b, **conv_args(c), out=out, backend=backend)
            assert got is out
            assert_close(out, want, torch.float32, rtol=1e-4, atol=1e-4)


def test_module_is_a_drop_in():
    torch_ct = torch.nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, groups=2, dilation=1)
    ct = vlfast.nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, groups=2, activation="relu")
    ct.load_state_dict(torch_ct.state_dict())
    assert isinstance(ct, torch.nn.ConvTranspose2d) and ct.state_dict().keys() == torch_ct.state_dict().keys()
    torch_ct.load_state_dict(ct.state_dict())
    x = torch.randn(2, 6, 5, 4)
    for size in (None, [10, 8], (2, 4, 9, 7)):  # output_size picks output_padding, as in torch
        assert_close(ct(x, size), F.relu(torch_ct(x, size)), torch.float32, rtol=1e-5, atol=1e-5)
    plain = vlfast.nn.ConvTranspose2d(6, 4, 2, stride=2, bias=False)
    assert plain.bias is None and "activation" not in repr(plain) and "relu" in repr(ct)
    assert_close(plain(x), F.conv_transpose2d(x, plain.weight, stride=2), torch.float32, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="activation"):
        vlfast.nn.ConvTranspose2d(6, 4, 2, activation="tanh")


def test_convert_swaps_instances_and_keeps_parameters():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ConvTranspose2d(8, 4, 2, stride=2),
                                torch.nn.Sequential(torch.nn.ConvTranspose2d(4, 2, 3, padding=1, bias=False)))
    x = torch.randn(2, 3, 9, 9)
    want = model(x)
    weight = model[1].weight
    vlfast.nn.convert(model)
    assert type(model[1]) is vlfast.nn.ConvTranspose2d and type(model[2][0]) is vlfast.nn.ConvTranspose2d
    assert model[1].weight is weight and model[2][0].bias is None and model[1].weight.device.type == "cpu"
    assert_close(model(x), want, torch.float32, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- GPU only
GPU_CASES = [case(2, 256, 128, 16, 16, 2, 2), case(2, 128, 64, 16, 16, 4, 2, 1), case(1, 64, 3, 32, 32, 4, 2, 1),
             case(1, 21, 21, 4, 4, 64, 32, 16), case(2, 256, 256, 8, 8, 3, 2, 1, 1),
             case(2, 96, 64, 9, 7, 3, 1, 2, 0, 2)]


@gpu
@pytest.mark.parametrize("dtype", list(DT), ids=DT.get)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("i", range(len(GPU_CASES)), ids=[case_id(c) for c in GPU_CASES])
def test_forward_cuda_shapes(dtype, channels_last, i):
    c = GPU_CASES[i]
    x, w, b = make(c, dtype, "cuda", channels_last=channels_last, seed=i)
    got = conv_transpose2d(x, w, b, **conv_args(c), activation="silu", backend="triton")
    hi, lo = reference(x, w, b, c, "silu", dtype)
    check(got, hi, lo, dtype)


@gpu
def test_cuda_graph_capture():
    """Nothing in the Triton path copies host data or syncs: it captures into a CUDA graph and replays."""
    c = GPU_CASES[1]
    x, w, b = make(c, torch.bfloat16, "cuda", channels_last=True)
    buf = torch.zeros((c["n"], c["cout"] + 8, 32, 32), device="cuda", dtype=torch.bfloat16)
    buf = buf.to(memory_format=torch.channels_last)
    with torch.no_grad():
        conv_transpose2d(x, w, b, **conv_args(c), activation="relu", out=buf[:, 8:], backend="triton")  # warm up
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            conv_transpose2d(x, w, b, **conv_args(c), activation="relu", out=buf[:, 8:], backend="triton")
    buf.zero_()
    x.copy_(torch.randn_like(x))
    graph.replay()
    hi, lo = reference(x, w, b, c, "relu", torch.bfloat16)
    check(buf[:, 8:], hi, lo, torch.bfloat16)
    assert not buf[:, :8].any()


@gpu
def test_tf32_cuda_is_close():
    c = GPU_CASES[0]
    x, w, b = make(c, torch.float32, "cuda")
    torch.backends.cudnn.allow_tf32 = True  # the no_tf32 fixture restores it
    got = conv_transpose2d(x, w, b, **conv_args(c), backend="triton")
    assert_close(got, reference(x, w, b, c, None, torch.float32)[0], torch.float32, rtol=1e-2, atol=1e-2)


def test_auto_uses_the_kernels_only_where_they_beat_cudnn():
    from vlfast.ops.conv_transpose import OP, _triton_pays

    def _kernels_pay(x, w, stride, padding, dilation, out):
        return _triton_pays(OP.check(x, w, None, stride, padding, 0, 1, dilation, None, out))
    x = torch.randn(2, 8, 5, 5, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    w2, w3 = torch.randn(8, 4, 2, 2, dtype=torch.bfloat16), torch.randn(8, 4, 3, 3, dtype=torch.bfloat16)
    one, zero = (1, 1), (0, 0)
    assert _kernels_pay(x, w2, (2, 2), zero, one, None)                            # the U-Net up-conv
    assert not _kernels_pay(x.float(), w2.float(), (2, 2), zero, one, None)        # fp32
    assert not _kernels_pay(x.contiguous(), w2, (2, 2), zero, one, None)           # NCHW ...
    out = torch.empty(2, 4, 10, 10, dtype=torch.bfloat16)
    assert _kernels_pay(x.contiguous(), w2, (2, 2), zero, one, out)                # ... unless writing into out
    assert not _kernels_pay(x, w3, (2, 2), (1, 1), one, None)                      # the phase kernel


@pytest.mark.parametrize("device,backend", backend_params("conv_transpose2d"))
def test_repeated_geometry_takes_the_planned_path(device, backend):
    """Eager inference caches its checks and launch plan per geometry: later calls with fresh data, an
    unbatched input, ``out=`` and another backend stay correct, fresh and report their backend."""
    c = CASES[5]
    x1, w, b = make(c, torch.float32, device, seed=1)
    x2, _, _ = make(c, torch.float32, device, seed=2)
    y1 = conv_transpose2d(x1, w, b, **conv_args(c), activation="relu", backend=backend)
    keep = y1.clone()
    y2 = conv_transpose2d(x2, w, b, **conv_args(c), activation="relu", backend=backend)  # the planned path
    assert vlfast.last_backend("conv_transpose2d") == backend
    assert torch.equal(y1, keep) and y2.data_ptr() != y1.data_ptr()
    assert_close(y2, reference(x2, w, b, c, "relu", torch.float32)[0], torch.float32, rtol=1e-4, atol=1e-4)
    for _ in range(2):
        got = conv_transpose2d(x2[0], w, b, **conv_args(c), backend=backend)
        assert_close(got, reference(x2[:1], w, b, c, None, torch.float32)[0][0], torch.float32, rtol=1e-4,
                     atol=1e-4)
        buf = torch.full((c["n"], c["cout"] + 2) + y2.shape[2:], 7.0, device=device)
        assert conv_transpose2d(x2, w, b, **conv_args(c), out=buf[:, 2:], backend=backend) is not None
        assert_close(buf[:, 2:], reference(x2, w, b, c, None, torch.float32)[0], torch.float32, rtol=1e-4, atol=1e-4)
        assert (buf[:, :2] == 7).all()
    conv_transpose2d(x2, w, b, **conv_args(c), backend="reference")
    assert vlfast.last_backend("conv_transpose2d") == "reference"


def test_planned_path_still_rejects_bad_arguments():
    c = CASES[0]
    x, w, b = make(c, torch.float32, "cpu")
    for _ in range(2):
        conv_transpose2d(x, w, b, **conv_args(c))  # plan cached for this geometry
    with pytest.raises(ValueError, match="bias"):
        conv_transpose2d(x, w, b[:-1], **conv_args(c))
    with pytest.raises(ValueError, match="activation"):
        conv_transpose2d(x, w, b, **conv_args(c), activation=["relu"])
    with pytest.raises(ValueError, match="groups"):
        conv_transpose2d(x, w, b, **dict(conv_args(c), groups=True))
    with pytest.raises(ValueError, match="out"):
        conv_transpose2d(x, w, b, **conv_args(c), out=torch.empty(1))


def test_module_calls_take_the_planned_path():
    """nn.Parameter weights count as plain tensors: a module's repeated calls reuse one plan."""
    import importlib
    ct_module = importlib.import_module("vlfast.ops.conv_transpose")
    m = vlfast.nn.ConvTranspose2d(4, 3, 2, stride=2)
    x = torch.randn(1, 4, 3, 3)
    ct_module.OP.plans.clear()
    with torch.no_grad():
        y1 = m(x)
        y2 = m(x)
    assert len(ct_module.OP.plans) == 1 and torch.equal(y1, y2)
