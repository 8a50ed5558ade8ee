"""The dispatch layer every op shares (vlfast/ops/_dispatch.py, vlfast/backends.py): the plan cache, the
selection rule of both directions, last_backend, and every input-dependent limit, where real sizes do not
fit in memory on meta tensors or with a patched limit."""

import importlib
import types

import pytest
import torch
import torch.nn.functional as F

import vlfast
from conftest import run_in_threads
from vlfast import backends
from vlfast.ops import _dispatch, _overrides, ddpm, ddpm_triton
from vlfast.testing import assert_close
from vlfast.testing import ddpm_coef as make_coef

# The op modules (vlfast.ops.group_norm is also the name of the function).
gn = importlib.import_module("vlfast.ops.group_norm")
ct = importlib.import_module("vlfast.ops.conv_transpose")
META = torch.device("meta")


def meta(*shape, dtype=torch.float16):
    return torch.empty(shape, dtype=dtype, device=META)


def reasons(backend, op, inputs, direction="forward"):
    return backends.not_supported_reasons(backend, op, inputs, direction)


# ---------------------------------------------------------------- the plan cache
def test_plan_cache_is_bounded_and_drops_the_oldest():
    cache = _dispatch.PlanCache(size=3)
    for k in range(3):
        cache.put(k, k)
    cache.put(0, "again")  # made again: now the newest
    cache.put(3, 3)
    assert len(cache) == 3 and cache.get(1) is None and cache.get(0) == "again" and cache.get(3) == 3


def test_plan_cache_from_several_threads():
    cache = _dispatch.PlanCache(size=16)

    def work(seed):
        for i in range(2000):
            key = (seed * 7 + i) % 40
            cache.put(key, key)
            got = cache.get(key)
            assert got is None or got == key
    assert not run_in_threads(work, 4) and len(cache) <= 16


def test_ops_called_from_several_threads_give_each_caller_its_result():
    """Threads share the plans of one op: each call still computes its own input, at several geometries."""
    shapes = [(2, 8, 5, 5), (3, 8, 4, 6), (1, 8, 7, 3)]
    results = {}

    def work(k):
        g = torch.Generator().manual_seed(k)
        for _ in range(5):
            x = torch.randn(shapes[k % 3], generator=g)
            with torch.no_grad():
                y = vlfast.ops.group_norm(x, 4, activation="silu", backend="reference")
            torch.testing.assert_close(y, F.silu(F.group_norm(x, 4)))
        results[k] = True
    assert not run_in_threads(work, 6) and len(results) == 6


def test_overrides_key_the_plan_cache():
    """A plan made under knobs serves calls under the same knobs only."""
    x = torch.randn(2, 8, 3, 3)
    gn.OP.plans.clear()
    with torch.no_grad(), _overrides.use(group_norm_single_max=0):
        for _ in range(2):
            vlfast.ops.group_norm(x, 4, backend="reference")
    assert len(gn.OP.plans) == 1
    with torch.no_grad():
        vlfast.ops.group_norm(x, 4, backend="reference")
    assert len(gn.OP.plans) == 2
    with torch.no_grad(), _overrides.use(group_norm_single_max=0):
        vlfast.ops.group_norm(x, 4, backend="reference")
    with torch.no_grad(), _overrides.use(group_norm_single_max=64):
        vlfast.ops.group_norm(x, 4, backend="reference")
    assert len(gn.OP.plans) == 3
    with pytest.raises(ValueError, match="unknown override"):
        with _overrides.use(no_such_knob=1):
            pass


def test_geometry_keys_tell_types_apart():
    def key(values, values_only=frozenset()):
        return _dispatch._geometry(values, values_only)[0]
    assert key((1,)) != key((True,))
    assert key(([1, 2],)) != key(((1, 2),))
    assert key((object(),)) is None
    assert key((0.5, 7), frozenset({0})) == key((0.25, 7), frozenset({0}))
    x = torch.ones(2, requires_grad=True)
    assert _dispatch._geometry((x, 1))[1] and not _dispatch._geometry((x.detach(), 1))[1]


# ---------------------------------------------------------------- the selection rule
def test_backend_requests_are_validated():
    for bad in ("bogus", "triton+bogus", "triton+cuda+cpp", "", 3):
        with pytest.raises(ValueError, match="backend"):
            vlfast.ops.group_norm(torch.randn(2, 4, 3), 2, backend=bad)


def test_forward_and_backward_named_apart_and_reported():
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    w = torch.randn(8, 4, 2, 2, requires_grad=True)
    ref_y = F.relu(F.conv_transpose2d(x, w, stride=2))
    want = torch.autograd.grad(ref_y.sum(), (x, w))
    for request, fwd, bwd in (("triton", "triton", "triton"), ("reference+triton", "reference", "triton"),
                              ("triton+reference", "triton", "reference"), ("auto", "reference", "reference")):
        y = vlfast.ops.conv_transpose2d(x, w, stride=2, activation="relu", backend=request)
        gx, gw = torch.autograd.grad(y.sum(), (x, w))
        assert (vlfast.last_backend("conv_transpose2d"), vlfast.last_backend("conv_transpose2d", "backward")) == \
            (fwd, bwd), request
        assert_close(y, ref_y, torch.float32, rtol=1e-4, atol=1e-4)
        assert_close(gx, want[0], torch.float32, rtol=1e-4, atol=1e-4, name="dx")
        assert_close(gw, want[1], torch.float32, rtol=1e-4, atol=1e-4, name="dw")


def test_a_single_name_runs_the_backward_where_it_can():
    """"triton" at dilation 2: the Triton backward takes dilation 1, so the backward goes to auto's choice;
    "triton+triton" names it and raises, listing the reason."""
    x = torch.randn(1, 4, 5, 5, requires_grad=True)
    w = torch.randn(4, 2, 3, 3, requires_grad=True)
    y = vlfast.ops.conv_transpose2d(x, w, stride=2, dilation=2, backend="triton")
    y.sum().backward()
    assert vlfast.last_backend("conv_transpose2d", "backward") == "reference"
    with pytest.raises(RuntimeError, match="dilation 1"):
        vlfast.ops.conv_transpose2d(x, w, stride=2, dilation=2, backend="triton+triton")


def test_eager_training_path_and_the_custom_ops_autograd_agree():
    """One declaration makes both: the entry's eager autograd.Function and the custom op's register_autograd."""
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    w, b, add = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True), torch.randn(2, 8)
    for backend in ("reference", "triton"):
        y1 = vlfast.ops.group_norm(x, 4, w, b, add=add, activation="silu", backend=backend)
        g1 = torch.autograd.grad((y1 * y1).sum(), (x, w, b))
        y2 = torch.ops.vlfast.group_norm_fwd(x, 4, w, b, 1e-5, add, None, None, 1, f"{backend}+{backend}")[0]
        g2 = torch.autograd.grad((y2 * y2).sum(), (x, w, b))
        torch.testing.assert_close(y1, y2)
        for a, e in zip(g1, g2):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- input-dependent limits
def test_group_norm_limit_int32_per_sample():
    big = gn.OP.check(meta(1, 32, 2**13, 2**13), 32, None, None, 1e-5, None, None, None, None)
    assert any("int32" in r for r in reasons("triton", "group_norm", big))
    small = gn.OP.check(meta(64, 32, 2**10, 2**10), 32, None, None, 1e-5, None, None, None, None)
    assert not gn.OP.limits("triton", "forward", small)  # 2**31 elements in the batch, not in one sample


def conv_inputs(x, w, stride=1, padding=0, groups=1, dilation=1, out=None):
    return ct.OP.check(x, w, None, stride, padding, 0, groups, dilation, None, out)


def test_conv_transpose_limits():
    # One sample past int32.
    i = conv_inputs(meta(1, 2**16, 2**8, 2**8), meta(2**16, 1, 1, 1))
    assert any("one sample" in r for r in ct.OP.limits("triton", "forward", i))
    # Batch-wide rows past int32 (each sample small).
    i = conv_inputs(meta(2**16, 1, 2**8, 2**8), meta(1, 1, 1, 1))
    assert any("rows" in r for r in ct.OP.limits("triton", "forward", i))
    assert any("rows" in r for r in ct.OP.limits("triton", "backward", i))
    # Groups on a grid axis.
    i = conv_inputs(meta(1, 65536, 1, 1), meta(65536, 1, 1, 1), groups=65536)
    assert any("groups" in r for r in ct.OP.limits("triton", "forward", i))
    # Dilation: the backward always, the sub-pixel kernel when forced.
    i = conv_inputs(meta(2, 4, 5, 5), meta(4, 2, 3, 3), stride=2, dilation=2)
    assert not ct.OP.limits("triton", "forward", i)
    assert any("dilation 1" in r for r in ct.OP.limits("triton", "backward", i))
    with _overrides.use(conv_transpose_kernel="subpixel"):
        assert any("sub-pixel" in r for r in ct.OP.limits("triton", "forward", i))
    # Every limit is the Triton kernels': the reference takes all of these.
    assert not ct.OP.limits("reference", "forward", i)


def test_ddpm_grid_limit_falls_back_under_auto_and_is_listed_when_forced(monkeypatch):
    monkeypatch.setattr(ddpm_triton, "MAX_GRID_Y", 1)  # 1 block per sample: a sample of 2048 elements is too large
    sample = torch.randn(2, 2048)
    with pytest.raises(RuntimeError, match="grid") as err:
        ddpm.fused_step(sample, sample, make_coef(), 3, backend="triton")
    assert "second axis" in str(err.value)
    monkeypatch.setattr(ddpm.OP, "order", lambda direction, inputs: ("triton", "cpp", "reference"))
    prev, _, _ = ddpm.fused_step(sample, sample, make_coef(), 3)  # auto: never raises
    assert vlfast.last_backend("ddpm_step") in ("cpp", "reference")
    want, _, _ = ddpm.fused_step(sample, sample, make_coef(), 3, backend="reference")
    torch.testing.assert_close(prev, want)


def test_a_forced_backend_lists_every_reason(monkeypatch):
    monkeypatch.setattr(ddpm_triton, "MAX_GRID_Y", 1)
    sample = torch.randn(2, 2048, dtype=torch.float64)
    inputs = ddpm.OP.check(sample, None, make_coef(), 3, None, None, None, None, 0, False, None, None, 0, None,
                           True, False)
    why = reasons("triton", "ddpm_step", inputs)
    assert any("float64" in r for r in why) and any("grid" in r for r in why)
    with pytest.raises(RuntimeError) as err:
        ddpm.fused_step(sample, None, make_coef(), 3, backend="triton")
    assert "float64" in str(err.value) and "grid" in str(err.value)


def test_a_cuda_kernel_left_out_of_the_build_is_a_reason(monkeypatch):
    """VLFAST_SKIP_CUDA=group_norm builds vlfast._C with CUDA but without that op's CUDA kernels: the cuda
    backend then says so for that op (and auto passes it by)."""
    monkeypatch.setattr(backends, "extension", lambda: types.SimpleNamespace(WITH_CUDA=True))
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key",
                        lambda name, key: not (key == "CUDA" and name.startswith("vlfast::group_norm")))
    backends._op_reasons.cache_clear()
    try:
        why = backends.not_supported_reasons("cuda", "group_norm", device=torch.device("cuda"))
        assert any("VLFAST_SKIP_CUDA" in r for r in why)
        assert not backends._op_reasons("cuda", "ddpm_step", "forward")
    finally:
        backends._op_reasons.cache_clear()


def test_available_reports_per_op_and_direction():
    table = backends.available("cpu", "conv2d", "backward")
    assert any("no cpp kernel for the backward" in r for r in table["cpp"])
    table = backends.available("cpu", "group_norm", "backward")  # aten's kernels: no vlfast._C op needed
    assert not table["cpp"]
    assert not table["reference"]
