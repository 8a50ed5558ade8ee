"""Output reuse and the CPU GroupNorm forward's cache paths.

- The CPU GroupNorm kernel where a task's slab of x fits the cache budget (output pass from the cache, the
  next task's slab prefetched) and where it does not (output pass backwards), forced with the knob
  ``group_norm_cpu_cache``, against float64: both layouts, every activation, odd sizes, poisoned outputs,
  in place; with streaming stores (knob ``group_norm_cpu_stream``) at every alignment of the output;
  bit-identical whichever path, store and thread count.
- ``out=`` of ``vlfast.ops.group_norm``, ``vlfast.ops.fused_step`` and the schedulers' ``step`` on every
  backend: the result of the call without it, written in place (same storage, version bumped), memory
  shared with an input, strides other than the kernels' own, PyTorch's refusals (stride 0, inference
  tensors), gradients, the noise stream, opcheck and torch.compile.
"""

import itertools

import pytest
import torch

import vlfast
from vlfast.activations import CODE
from vlfast.ops import _overrides
from vlfast.ops.ddpm import fused_step
from vlfast.ops.group_norm import group_norm
from vlfast.reference.group_norm import group_norm as ref_group_norm
from vlfast.schedulers import DDIMScheduler, DDPMScheduler
from vlfast.testing import assert_close, assert_low_precision_close, ddpm_coef, torch_group_norm

from conftest import DT, backend_params

try:
    import vlfast._C  # noqa: F401
except ImportError:
    pass
HAS_CPP = hasattr(torch.ops.vlfast, "group_norm_fwd_out_kernel")
cpp = pytest.mark.skipif(not HAS_CPP, reason="vlfast._C has no group_norm_fwd_out_kernel")

pytestmark = pytest.mark.usefixtures("poison_empty")

# Cache budgets (bytes) that put every test shape's slabs beyond it (output pass backwards), within it (the next
# slab prefetched), and the automatic one (half the per-core L2).
BUDGETS = {"beyond": 0, "within": 1 << 30, "auto": None}


def make_gn(shape, channels_last=False, dtype=torch.float32, seed=0, params=("weight", "bias", "add", "scale",
                                                                              "shift")):
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    x = torch.randn(shape, generator=g) * 2 + 0.5
    x = (x.to(memory_format=torch.channels_last) if channels_last else x).to(dtype)
    p = {"weight": torch.randn(c, generator=g) * 0.5 + 1, "bias": torch.randn(c, generator=g),
         "add": torch.randn(n, c, generator=g), "scale": torch.randn(n, c, generator=g) * 0.3,
         "shift": torch.randn(n, c, generator=g)}
    return x, {k: v for k, v in p.items() if k in params}


def gn_reference(x, groups, p, activation):
    return ref_group_norm(x.double(), groups, p.get("weight"), p.get("bias"), 1e-5, add=p.get("add"),
                          scale=p.get("scale"), shift=p.get("shift"), activation=activation,
                          compute_dtype=torch.float64)


def gn_check(got, x, groups, p, activation, name=""):
    hi = gn_reference(x, groups, p, activation)
    if x.dtype == torch.float32:
        assert_close(got, hi, torch.float32, name=name)
    else:
        lo = torch_group_norm(x, groups, p.get("weight"), p.get("bias"), 1e-5, add=p.get("add"),
                              scale=p.get("scale"), shift=p.get("shift"), activation=activation)
        assert_low_precision_close(got, hi, lo, name=name)


def kernel(x, groups, p, activation, out=None):
    args = (x, groups, p.get("weight"), p.get("bias"), 1e-5, p.get("add"), p.get("scale"), p.get("shift"),
            CODE[activation])
    if out is None:
        return torch.ops.vlfast.group_norm_fwd_kernel(*args)
    return (out,) + tuple(torch.ops.vlfast.group_norm_fwd_out_kernel(*args, out))


# ---------------------------------------------------------------- the CPU kernel's cache paths
# (shape, groups): several fused tasks a thread (prefetch of the next), odd sizes, channels split into more than
# one unit (NCHW 4096 values, channels-last 64 rows), one sample (three phases with two threads), rank 3.
CACHE_SHAPES = [((4, 12, 33, 31), 4), ((3, 8, 65, 70), 2), ((4, 6, 7, 5), 3), ((1, 8, 64, 64), 1), ((4, 16, 999), 8)]


@cpp
@pytest.mark.parametrize("budget", list(BUDGETS))
@pytest.mark.parametrize("activation", list(CODE), ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape,groups", CACHE_SHAPES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple)
                         else f"G{v}")
def test_cache_paths_against_float64(shape, groups, layout, activation, budget):
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last is 4-D")
    x, p = make_gn(shape, layout == "channels_last")
    with _overrides.use(group_norm_cpu_cache=BUDGETS[budget]):
        out, mean, rstd = kernel(x, groups, p, activation)
        poisoned = torch.full_like(x, float("nan"))
        into = kernel(x, groups, p, activation, poisoned)
    assert out.stride() == x.stride()
    gn_check(out, x, groups, p, activation, name=f"{budget} {layout}")
    assert torch.equal(into[0], out) and torch.equal(into[1], mean) and torch.equal(into[2], rstd)


@cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("budget", ["beyond", "within"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cache_paths_other_dtypes(dtype, budget, layout):
    x, p = make_gn((4, 12, 33, 31), layout == "channels_last", dtype)
    if dtype == torch.float64:
        p = {k: v.double() for k, v in p.items()}
    with _overrides.use(group_norm_cpu_cache=BUDGETS[budget]):
        out = kernel(x, 4, p, "silu")[0]
    if dtype == torch.float64:
        assert_close(out, gn_reference(x, 4, p, "silu"), torch.float64)
    else:
        gn_check(out, x, 4, p, "silu")


@cpp
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cache_paths_bit_identical_across_budgets_and_threads(layout):
    x, p = make_gn((4, 12, 65, 70), layout == "channels_last")
    results = []
    threads = torch.get_num_threads()
    try:
        for n_threads, budget, stream in itertools.product((threads, 1), BUDGETS.values(), (False, True)):
            torch.set_num_threads(n_threads)
            with _overrides.use(group_norm_cpu_cache=budget, group_norm_cpu_stream=stream):
                results.append(kernel(x, 4, p, "gelu"))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@cpp
@pytest.mark.parametrize("budget", list(BUDGETS))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape,groups", [((4, 12, 33, 31), 4), ((1, 8, 64, 64), 1)], ids=["fused", "phases"])
def test_kernel_in_place(shape, groups, layout, budget):
    """The kernel's out may be its input itself: every value is read before its output is written."""
    x, p = make_gn(shape, layout == "channels_last")
    with _overrides.use(group_norm_cpu_cache=BUDGETS[budget]):
        want = kernel(x, groups, p, "silu")[0]
        y = x.clone()
        kernel(y, groups, p, "silu", y)
    assert torch.equal(y, want)


@cpp
@pytest.mark.parametrize("budget", ["beyond", "within"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape,groups", CACHE_SHAPES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple)
                         else f"G{v}")
def test_streaming_stores_write_what_cached_stores_write(shape, groups, layout, budget):
    """The NCHW float32 output by streaming stores (forced on these small shapes) is bit for bit the output by
    cached stores, into a fresh output and into an ``out`` at every alignment (the unaligned head and the
    tail of each channel); channels-last (never streamed) and in place keep cached stores, the same bits."""
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last is 4-D")
    x, p = make_gn(shape, layout == "channels_last")
    with _overrides.use(group_norm_cpu_cache=BUDGETS[budget], group_norm_cpu_stream=False):
        want = kernel(x, groups, p, "silu")
    gn_check(want[0], x, groups, p, "silu")
    with _overrides.use(group_norm_cpu_cache=BUDGETS[budget], group_norm_cpu_stream=True):
        got = kernel(x, groups, p, "silu")
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        for offset in (1, 5, 16):  # elements past a 64-byte boundary
            buf = torch.full((x.numel() + 16,), float("nan"))
            out = buf[offset:offset + x.numel()].as_strided(x.shape, x.stride())
            kernel(x, groups, p, "silu", out)
            assert torch.equal(out, want[0]), offset
            assert buf[:offset].isnan().all() and buf[offset + x.numel():].isnan().all()
        y = x.clone()
        kernel(y, groups, p, "silu", y)
        assert torch.equal(y, want[0])


@cpp
def test_stream_knob():
    assert torch.ops.vlfast.group_norm_cpu_stream() == -1
    with _overrides.use(group_norm_cpu_stream=True):
        assert torch.ops.vlfast.group_norm_cpu_stream() == 1
        with _overrides.use(group_norm_cpu_stream=False):
            assert torch.ops.vlfast.group_norm_cpu_stream() == 0
        assert torch.ops.vlfast.group_norm_cpu_stream() == 1
    assert torch.ops.vlfast.group_norm_cpu_stream() == -1
    with pytest.raises(ValueError, match="group_norm_cpu_stream"):
        with _overrides.use(group_norm_cpu_stream=1):
            pass


@cpp
def test_kernel_out_refusals():
    x, p = make_gn((2, 8, 6, 6))
    with pytest.raises(RuntimeError, match="strides"):
        kernel(x, 4, p, None, torch.empty_like(x, memory_format=torch.channels_last))
    with pytest.raises(RuntimeError, match="dtype"):
        kernel(x, 4, p, None, torch.empty_like(x, dtype=torch.float64))
    flat = torch.randn(2 * x.numel())
    a, b = flat[:x.numel()].view(x.shape), flat[x.numel() // 2:x.numel() // 2 + x.numel()].view(x.shape)
    with pytest.raises(RuntimeError, match="overlap|memory location"):
        kernel(a, 4, p, None, b)
    with pytest.raises(RuntimeError, match="overlap|memory location"):
        kernel(x, 4, {"weight": flat[:8]}, None, flat[:x.numel()].view(x.shape))


@cpp
def test_cache_knob():
    before = torch.ops.vlfast.group_norm_cpu_cache()
    with _overrides.use(group_norm_cpu_cache=12345):
        assert torch.ops.vlfast.group_norm_cpu_cache() == 12345
        with _overrides.use(group_norm_cpu_cache=None):
            assert torch.ops.vlfast.group_norm_cpu_cache() == -1  # None unsets it: automatic
        assert torch.ops.vlfast.group_norm_cpu_cache() == 12345
    assert torch.ops.vlfast.group_norm_cpu_cache() == before == -1
    with pytest.raises(ValueError, match="group_norm_cpu_cache"):
        with _overrides.use(group_norm_cpu_cache=-3):
            pass


# ---------------------------------------------------------------- group_norm(out=)
GN_BACKENDS = backend_params("group_norm")


def gn(x, p, backend, **kw):
    return group_norm(x, 4, p["weight"], p["bias"], add=p["add"], scale=p["scale"], shift=p["shift"],
                      activation="silu", backend=backend, **kw)


@pytest.mark.parametrize("device,backend", GN_BACKENDS)
@pytest.mark.parametrize("dtype", list(DT), ids=DT.get)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_group_norm_out_equals_fresh(device, backend, dtype, layout):
    x, p = make_gn((2, 8, 7, 5), layout == "channels_last", dtype)
    x, p = x.to(device), {k: v.to(device) for k, v in p.items()}
    want = gn(x, p, backend)
    for _ in range(2):  # the checked path, then the cached plan
        out = torch.full_like(want, float("nan"))
        ptr, version = out.data_ptr(), out._version
        got = gn(x, p, backend, out=out)
        assert got is out and out.data_ptr() == ptr and out._version > version
        assert torch.equal(out, want)
        assert vlfast.last_backend("group_norm") == backend


@pytest.mark.parametrize("device,backend", GN_BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_group_norm_out_in_place_and_overlapping(device, backend, layout):
    x, p = make_gn((2, 8, 7, 5), layout == "channels_last")
    x, p = x.to(device), {k: v.to(device) for k, v in p.items()}
    want = gn(x, p, backend)
    for _ in range(2):
        y = x.clone()
        ptr = y.data_ptr()
        assert gn(y, p, backend, out=y) is y and y.data_ptr() == ptr
        assert torch.equal(y, want)
    # out and x in one buffer, half a tensor apart: computed through a temporary.
    n = x.numel()
    flat = torch.empty(2 * n, device=device)
    a = flat[:n].view(x.shape) if layout == "nchw" else flat[:n].view(2, 7, 5, 8).permute(0, 3, 1, 2)
    b = flat[n // 2:n // 2 + n].view(x.shape) if layout == "nchw" else \
        flat[n // 2:n // 2 + n].view(2, 7, 5, 8).permute(0, 3, 1, 2)
    a.copy_(x)
    assert gn(a, p, backend, out=b) is b
    assert torch.equal(b, want)
    # a parameter sharing out's memory
    q = dict(p)
    buf = torch.empty(2, 8, 7, 5, device=device)
    q["weight"] = buf.view(-1)[:8]
    q["weight"].copy_(p["weight"])
    gn(x, q, backend, out=buf)
    assert torch.equal(buf, gn(x, p, backend).contiguous())


@pytest.mark.parametrize("device,backend", GN_BACKENDS)
@pytest.mark.parametrize("buffer_layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_group_norm_out_other_strides(device, backend, buffer_layout, layout):
    """out a channel slice of a bigger buffer, or in the other memory format: the rest stays as it was."""
    x, p = make_gn((2, 8, 7, 5), layout == "channels_last")
    x, p = x.to(device), {k: v.to(device) for k, v in p.items()}
    want = gn(x, p, backend)
    buf = torch.arange(2 * 11 * 7 * 5, dtype=torch.float32, device=device).reshape(2, 11, 7, 5)
    if buffer_layout == "nhwc":
        buf = buf.to(memory_format=torch.channels_last)
    before = buf.clone()
    assert gn(x, p, backend, out=buf[:, 2:10]) is not None
    assert torch.equal(buf[:, 2:10], want)
    assert torch.equal(buf[:, :2], before[:, :2]) and torch.equal(buf[:, 10:], before[:, 10:])
    other = torch.empty_like(x, memory_format=torch.contiguous_format if layout == "channels_last"
                             else torch.channels_last)
    gn(x, p, backend, out=other)
    assert torch.equal(other, want)


@pytest.mark.parametrize("device,backend", GN_BACKENDS)
def test_group_norm_out_refusals(device, backend):
    x, p = make_gn((2, 8, 7, 5))
    x, p = x.to(device), {k: v.to(device) for k, v in p.items()}
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        gn(x, p, backend, out=torch.empty(1, 8, 7, 5, device=device).expand(2, 8, 7, 5))
    with pytest.raises(ValueError, match="out"):
        gn(x, p, backend, out=torch.empty(2, 8, 7, 6, device=device))
    with pytest.raises(TypeError, match="out"):
        gn(x, p, backend, out=torch.empty(2, 8, 7, 5, dtype=torch.float64, device=device))
    with torch.inference_mode():
        frozen = torch.empty(2, 8, 7, 5, device=device)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="Inplace update to inference tensor"):
            gn(x, p, backend, out=frozen)
    with torch.inference_mode():
        assert torch.equal(gn(x, p, backend, out=frozen), gn(x, p, backend))


@pytest.mark.parametrize("device,backend", GN_BACKENDS)
def test_group_norm_out_bumps_version_and_records_gradients(device, backend):
    x, p = make_gn((2, 8, 7, 5))
    x, p = x.to(device), {k: v.to(device) for k, v in p.items()}
    buf = torch.zeros_like(x)
    a = torch.ones_like(buf, requires_grad=True)
    y = a * buf  # saves buf for a's gradient
    gn(x, p, backend, out=buf)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    # Inputs that require grad: a copy into out that autograd records, as conv2d's out= does.
    leaves = {k: v.clone().requires_grad_() for k, v in p.items()}
    xg = x.clone().requires_grad_()
    dy = torch.randn_like(x)
    out = torch.empty(2, 10, 7, 5, device=device)[:, 1:9]
    gn(xg, leaves, backend, out=out)
    got = torch.autograd.grad(out, [xg, *leaves.values()], dy)
    want = torch.autograd.grad(gn(xg, leaves, backend), [xg, *leaves.values()], dy)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("device,backend", GN_BACKENDS)
def test_group_norm_out_opcheck_and_compile(device, backend):
    x, p = make_gn((2, 8, 4, 3))
    x, p = x.to(device), {k: v.to(device) for k, v in p.items()}
    args = (x, 4, p["weight"], p["bias"], 1e-5, p["add"], None, p["shift"], CODE["silu"], backend)
    torch.library.opcheck(torch.ops.vlfast.group_norm_fwd_out.default, args + (torch.empty_like(x),))
    if backend == "triton" and device == "cpu":
        return  # Inductor does not run the Triton interpreter
    torch.use_deterministic_algorithms(False)

    def f(x):
        buf = torch.zeros(2, 9, 4, 3, device=device)
        gn(x, p, backend, out=buf[:, 1:])
        return buf
    buf = torch.compile(f, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")(x)
    assert_close(buf[:, 1:], gn(x, p, backend), torch.float32)
    assert not buf[:, 0].any()


@cpp
def test_group_norm_out_kernel_opcheck():
    x, p = make_gn((2, 8, 4, 3))
    args = (x, 4, p["weight"], p["bias"], 1e-5, p["add"], None, None, 1, torch.empty_like(x))
    torch.library.opcheck(torch.ops.vlfast.group_norm_fwd_out_kernel.default, args,
                          test_utils=("test_schema", "test_autograd_registration"))


# ---------------------------------------------------------------- fused_step(out=) and step(out=)
DDPM_BACKENDS = backend_params("ddpm_step")


def ddpm_inputs(shape=(3, 4, 9, 7), device="cpu", channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, m, z = (torch.randn(shape, generator=g).to(device) for _ in range(3))
    if channels_last:
        x, m, z = (t.to(memory_format=torch.channels_last) for t in (x, m, z))
    return x, m, z


@pytest.mark.parametrize("device,backend", DDPM_BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("noise", ["drawn", "given", "none"])
def test_fused_step_out_equals_fresh(device, backend, layout, noise):
    x, m, z = ddpm_inputs(device=device, channels_last=layout == "channels_last")
    coef = ddpm_coef().to(device)
    kw = dict(clip=1.0, write_noise=True, backend=backend)
    kw.update({"drawn": dict(draw_noise=True, seed=7, offset=3), "given": dict(noise=z), "none": {}}[noise])
    want = fused_step(x, m, coef, 5, **kw)
    for _ in range(2):
        out = torch.full_like(x, float("nan"))
        ptr, version = out.data_ptr(), out._version
        prev, x0, zz = fused_step(x, m, coef, 5, out=out, **kw)
        assert prev is out and out.data_ptr() == ptr and out._version > version
        assert torch.equal(out, want[0]) and torch.equal(x0, want[1])
        assert (zz is None) == (want[2] is None) and (zz is None or torch.equal(zz, want[2]))


@pytest.mark.parametrize("device,backend", DDPM_BACKENDS)
@pytest.mark.parametrize("target", ["sample", "model_output", "noise"])
def test_fused_step_out_is_an_input(device, backend, target):
    """out may be sample, model_output or noise itself: elementwise, each block is read before it is written."""
    x, m, z = ddpm_inputs((3, 4, 33, 35), device)
    coef = ddpm_coef().to(device)
    want = fused_step(x, m, coef, 5, noise=z, backend=backend)
    for _ in range(2):
        ins = {"sample": x.clone(), "model_output": m.clone(), "noise": z.clone()}
        out = ins[target]
        ptr = out.data_ptr()
        prev, x0, _ = fused_step(ins["sample"], ins["model_output"], coef, 5, noise=ins["noise"], out=out,
                                 backend=backend)
        assert prev is out and out.data_ptr() == ptr
        assert torch.equal(out, want[0]) and torch.equal(x0, want[1])


@pytest.mark.parametrize("device,backend", DDPM_BACKENDS)
def test_fused_step_out_overlapping_and_strided(device, backend):
    x, m, _ = ddpm_inputs(device=device)
    coef = ddpm_coef().to(device)
    want = fused_step(x, m, coef, 5, clip=1.0, backend=backend)[0]
    n = x.numel()
    flat = torch.empty(2 * n, device=device)
    a, b = flat[:n].view(x.shape), flat[n // 3:n // 3 + n].view(x.shape)
    a.copy_(x)
    assert fused_step(a, m, coef, 5, clip=1.0, out=b, backend=backend)[0] is b
    assert torch.equal(b, want)
    buf = torch.arange(3 * 7 * 9 * 7, dtype=torch.float32, device=device).reshape(3, 7, 9, 7)
    before = buf.clone()
    fused_step(x, m, coef, 5, clip=1.0, out=buf[:, 2:6], backend=backend)  # batch-strided channel slice
    assert torch.equal(buf[:, 2:6], want)
    assert torch.equal(buf[:, :2], before[:, :2]) and torch.equal(buf[:, 6:], before[:, 6:])
    other = torch.empty_like(x, memory_format=torch.channels_last)
    fused_step(x, m, coef, 5, clip=1.0, out=other, backend=backend)
    assert torch.equal(other, want)


@pytest.mark.parametrize("device,backend", DDPM_BACKENDS)
def test_fused_step_out_refusals(device, backend):
    x, m, _ = ddpm_inputs(device=device)
    coef = ddpm_coef().to(device)
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        fused_step(x, m, coef, 5, out=torch.empty(1, 4, 9, 7, device=device).expand(3, 4, 9, 7), backend=backend)
    with pytest.raises(TypeError, match="out"):
        fused_step(x, m, coef, 5, out=torch.empty_like(x, dtype=torch.float64), backend=backend)
    with pytest.raises(ValueError, match="out"):
        fused_step(x, m, coef, 5, out=torch.empty(3, 4, 9, 8, device=device), backend=backend)
    with torch.inference_mode():
        frozen = torch.empty_like(x)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="Inplace update to inference tensor"):
            fused_step(x, m, coef, 5, out=frozen, backend=backend)
    buf = torch.zeros_like(x)
    a = torch.ones_like(buf, requires_grad=True)
    y = a * buf
    fused_step(x, m, coef, 5, out=buf, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("device,backend", DDPM_BACKENDS)
def test_fused_step_out_opcheck_and_compile(device, backend):
    x, m, z = ddpm_inputs((2, 3, 4, 5), device)
    coef = ddpm_coef().to(device)
    state = torch.zeros(2, dtype=torch.int64, device=device)
    for args in [(x, m, None, z, coef, None, 3, None, 1.0, 0, False, 0, 0, None, True, True, backend),
                 (x, m, None, None, coef, None, 3, None, float("inf"), 0, True, 5, 0, state, False, True, backend)]:
        torch.library.opcheck(torch.ops.vlfast.ddpm_step_out.default, args + (torch.empty_like(x),),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    if backend == "triton" and device == "cpu":
        return  # Inductor does not run the Triton interpreter
    torch.use_deterministic_algorithms(False)

    def step(x, m, z):
        buf = torch.zeros(2, 4, 4, 5, device=device)
        fused_step(x, m, coef, 3, noise=z, clip=1.0, out=buf[:, 1:], backend=backend)
        return buf
    buf = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")(x, m, z)
    assert_close(buf[:, 1:], fused_step(x, m, coef, 3, noise=z, clip=1.0, backend=backend)[0], torch.float32)
    assert not buf[:, 0].any()


@cpp
def test_ddpm_step_out_kernel_refusals_and_opcheck():
    x, m, z = ddpm_inputs((2, 3, 4, 5))
    coef = ddpm_coef()
    args = (x, m, None, z, coef, None, 3, None, 1.0, 0, False, 0, 0, None, True, True)
    torch.library.opcheck(torch.ops.vlfast.ddpm_step_out_kernel.default, args + (torch.empty_like(x),),
                          test_utils=("test_schema", "test_autograd_registration"))
    with pytest.raises(RuntimeError, match="out"):
        torch.ops.vlfast.ddpm_step_out_kernel(*args, torch.empty_like(x, memory_format=torch.channels_last))
    flat = torch.randn(2 * x.numel())
    a, b = flat[:x.numel()].view(x.shape), flat[7:7 + x.numel()].view(x.shape)
    with pytest.raises(RuntimeError, match="memory location"):
        torch.ops.vlfast.ddpm_step_out_kernel(a, *args[1:], b)
    big = torch.zeros(x.numel() + coef.numel())
    shared = big[:coef.numel()].view(coef.shape).copy_(coef)
    with pytest.raises(RuntimeError, match="memory location"):
        torch.ops.vlfast.ddpm_step_out_kernel(x, m, None, z, shared, *args[5:], big[:x.numel()].view(x.shape))


def scheduler(kind):
    s = DDPMScheduler(num_train_timesteps=100) if kind == "ddpm" else DDIMScheduler(num_train_timesteps=100)
    s.set_timesteps(10)
    return s


def step(s, kind, eps, t, x, generator, **kw):
    if kind == "ddpm":
        return s.step(eps, t, x, generator=generator, **kw)
    return s.step(eps, t, x, eta=1.0, generator=generator, **kw)


@pytest.mark.parametrize("device,backend", DDPM_BACKENDS)
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("generators", ["one", "list"])
def test_scheduler_step_out(device, backend, kind, generators):
    """step(..., out=): prev_sample is out, equal to the step without it; the generators' streams identical."""
    x, eps, _ = ddpm_inputs((2, 3, 8, 8), device)

    def gens():
        if generators == "one":
            return torch.Generator(device).manual_seed(3)
        return [torch.Generator(device).manual_seed(3 + i) for i in range(2)]
    sa, sb = scheduler(kind), scheduler(kind)
    ga, gb = gens(), gens()
    xa, xb = x.clone(), x.clone()
    out = torch.empty_like(x)
    for t in sa.timesteps[:3]:
        a = step(sa, kind, eps, t, xa, ga, backend=backend)
        b = step(sb, kind, eps, t, xb, gb, out=out, backend=backend)
        assert b.prev_sample is out and b[0] is out
        assert torch.equal(a.prev_sample, out) and torch.equal(a.pred_original_sample, b.pred_original_sample)
        xa, xb = a.prev_sample, out.clone()
    for g, h in zip(ga if isinstance(ga, list) else [ga], gb if isinstance(gb, list) else [gb]):
        assert torch.equal(g.get_state(), h.get_state())
    # In place: out is the sample itself, the loop allocating nothing for x.
    sc, gc = scheduler(kind), gens()
    xc = x.clone()
    for t in sc.timesteps[:3]:
        r = step(sc, kind, eps, t, xc, gc, out=xc, return_pred_original_sample=False, return_dict=False,
                 backend=backend)
        assert r[0] is xc and r[1] is None
    assert torch.equal(xc, xa)
