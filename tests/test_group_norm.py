"""vlfast.ops.group_norm and vlfast.nn.GroupNorm on every backend against the float64 reference."""

import pytest
import torch
import torch.nn.functional as F

import vlfast
from vlfast.ops.group_norm import group_norm
from vlfast.reference import group_norm as ref
from vlfast.testing import assert_close, assert_low_precision_close, torch_group_norm

from conftest import DT, backend_params

pytestmark = pytest.mark.usefixtures("poison_empty")
PATTERNS = {
    "plain": dict(),
    "ddpm": dict(add=True, activation="silu"),
    "adm": dict(scale=True, shift=True, activation="silu"),
    "all-gelu": dict(add=True, scale=True, shift=True, activation="gelu"),
    "shift-relu": dict(shift=True, activation="relu"),
}
SHAPES = {"N2-C8-G4-7x5": ((2, 8, 7, 5), 4), "N1-C6-G6-1x1": ((1, 6, 1, 1), 6), "N3-C4-G1-3x2": ((3, 4, 3, 2), 1)}


def make(shape, groups, dtype, device, pattern, affine=True, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(device, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    p = PATTERNS[pattern]
    kw = {k: torch.randn(n, c, generator=g).to(device) * 0.5 for k in ("add", "scale", "shift") if p.get(k)}
    if affine:
        kw["weight"] = torch.randn(c, generator=g).to(device)
        kw["bias"] = torch.randn(c, generator=g).to(device)
    kw["activation"] = p.get("activation")
    return x, kw


def reference(x, groups, kw, dtype):
    """(float64 result, the same as PyTorch computes it in ``dtype``: F.group_norm and modules)."""
    r = {k: v for k, v in kw.items() if k not in ("weight", "bias")}
    hi = ref.group_norm(x.double(), groups, kw.get("weight"), kw.get("bias"), compute_dtype=torch.float64, **r)
    return hi, torch_group_norm(x, groups, **kw)


def interpreter_ulps(device, backend, dtype) -> float:
    """2026-12: Triton 3.9's interpreter casts fp32 to bf16 by truncation (its cast_impl passes no rounding
    mode), where a GPU rounds to nearest: the Triton kernels' bf16 outputs on CPU may be off by one more ulp."""
    return 1.0 if (device, backend, dtype) == ("cpu", "triton", torch.bfloat16) else 0.0


def check(got, hi, lo, dtype, name="out", ulps=0.0):
    assert got.dtype == dtype and got.shape == hi.shape
    if dtype == torch.float32:
        assert_close(got, hi, torch.float32, rtol=1e-4, atol=1e-4, name=name)
    else:
        assert_low_precision_close(got, hi, lo, ulps=ulps, name=name)


@pytest.mark.parametrize("device,backend", backend_params("group_norm"))
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("dtype", list(DT), ids=DT.get)
@pytest.mark.parametrize("case", list(SHAPES))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_forward(device, backend, pattern, dtype, case, channels_last):
    shape, groups = SHAPES[case]
    x, kw = make(shape, groups, dtype, device, pattern, channels_last=channels_last)
    with vlfast.use_backend(backend):
        got = group_norm(x, groups, **kw)
    assert vlfast.last_backend("group_norm") == backend
    hi, lo = reference(x, groups, kw, dtype)
    check(got, hi, lo, dtype, ulps=interpreter_ulps(device, backend, dtype))
    if channels_last and shape[2] * shape[3] > 1:
        assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DT.get)
def test_low_precision_rule_rejects_mutants(dtype):
    """The fp16/bf16 rule (twice PyTorch's own error, F.group_norm in that dtype) is tight enough to tell
    a kernel with eps = 1e-2 for 1e-5, or tanh-GELU for erf-GELU, from a right one: each computed as a
    kernel would (fp32 on the low-precision inputs, rounded once)."""
    x, kw = make((2, 64, 16, 16), 32, dtype, "cpu", "all-gelu")
    hi, lo = reference(x, 32, kw, dtype)
    r = {k: v for k, v in kw.items() if k not in ("weight", "bias", "activation")}

    def kernel_like(eps=1e-5, activation="gelu", then=lambda y: y):
        return then(ref.group_norm(x.float(), 32, kw["weight"], kw["bias"], eps, activation=activation, **r)).to(dtype)
    assert_low_precision_close(kernel_like(), hi, lo)
    for name, mutant in (("eps", kernel_like(eps=1e-2)),
                         ("tanh-gelu", kernel_like(activation=None, then=lambda y: F.gelu(y, approximate="tanh")))):
        with pytest.raises(AssertionError, match="elements off"):
            assert_low_precision_close(mutant, hi, lo, name=name)


@pytest.mark.parametrize("device,backend", backend_params("group_norm"))
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_backward_matches_reference(device, backend, pattern, affine):
    x, kw = make((2, 8, 5, 3), 4, torch.float32, device, pattern, affine=affine)
    leaves = {k: v.requires_grad_() for k, v in kw.items() if isinstance(v, torch.Tensor)}
    x.requires_grad_()
    dy = torch.randn_like(x)
    with vlfast.use_backend(backend):
        out = group_norm(x, 4, **kw)
    out.backward(dy)
    got = [x.grad] + [leaves[k].grad for k in sorted(leaves)]
    x64 = x.detach().double().requires_grad_()
    kw64 = {k: (v.detach().double().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ref.group_norm(x64, 4, kw64.get("weight"), kw64.get("bias"), compute_dtype=torch.float64,
                   **{k: v for k, v in kw64.items() if k not in ("weight", "bias")}).backward(dy.double())
    want = [x64.grad] + [kw64[k].grad for k in sorted(leaves)]
    for name, g, w in zip(["input"] + sorted(leaves), got, want):
        assert_close(g, w, torch.float32, rtol=2e-4, atol=2e-4, name=f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DT.get)
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "strided", "3d", "5d", "batch0"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_cpp_backward_equals_the_references(dtype, layout, pattern):
    """cpp's backward (aten's CPU GroupNorm kernels around the fused extras, in float32) against the written-out
    reference's, both computing in float32 and rounding once: every layout the forward takes, 16-bit inputs
    with float32 parameters, batch 0."""
    shape = {"3d": (2, 8, 11), "5d": (2, 8, 3, 2, 3), "batch0": (0, 8, 4, 4)}.get(layout, (3, 8, 5, 7))
    x, kw = make(shape, 4, dtype, "cpu", pattern, channels_last=layout == "nhwc")
    if layout == "strided":
        x = make((3, 8, 10, 7), 4, dtype, "cpu", pattern)[0][:, :, ::2]
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    grads = {}
    for backend in ("cpp", "reference"):
        leaves = [x.detach().clone(memory_format=torch.preserve_format).requires_grad_()]
        extras = {k: (v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        leaves += [extras[k] for k in sorted(extras) if isinstance(extras[k], torch.Tensor)]
        with vlfast.use_backend(backend):
            group_norm(leaves[0], 4, **extras).backward(dy)
        assert vlfast.last_backend("group_norm", "backward") == backend
        grads[backend] = [t.grad for t in leaves]
    for i, (got, want) in enumerate(zip(grads["cpp"], grads["reference"])):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert_close(got, want, got.dtype, rtol=TOL_BWD[dtype], atol=TOL_BWD[dtype], name=f"grad {i}")


TOL_BWD = {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
def test_gradcheck_fp64(activation):
    """The written-out backward of the reference path against finite differences."""
    g = torch.Generator().manual_seed(3)
    args = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True)
            for s in [(2, 6, 3, 2), (6,), (6,), (2, 6), (2, 6), (2, 6)]]

    def f(x, w, b, add, scale, shift):
        return group_norm(x, 3, w, b, add=add, scale=scale, shift=shift, activation=activation)
    assert torch.autograd.gradcheck(f, args)


def layout_input(layout, device):
    """(input, groups) of a named layout: rank 3 to 5, dense or not, size-1 dims (where aten's layout
    rules have their corner cases)."""
    g = torch.Generator().manual_seed(5)

    def permuted(shape, order):  # a dense tensor of ``shape`` whose dims lie in memory in ``order``
        return torch.randn([shape[d] for d in order], generator=g).permute([order.index(d) for d in range(len(order))])
    x, groups = {
        "ncl": (permuted((2, 6, 5), (0, 1, 2)), 3),
        "ncl-t": (permuted((2, 6, 5), (0, 2, 1)), 3),
        "ncl-strided": (torch.randn(2, 6, 10, generator=g)[..., ::2], 3),
        "nchw": (permuted((2, 6, 3, 4), (0, 1, 2, 3)), 3),
        "nhwc": (permuted((2, 6, 3, 4), (0, 2, 3, 1)), 3),
        "nhwc-strided": (permuted((2, 6, 3, 8), (0, 2, 3, 1))[..., ::2], 3),
        "nhwc-1x1": (permuted((3, 6, 1, 1), (0, 2, 3, 1)), 2),
        "nhwc-Hx1": (permuted((2, 6, 3, 1), (0, 2, 3, 1)), 3),
        "nhwc-N1": (permuted((1, 6, 3, 4), (0, 2, 3, 1)), 3),
        "nhwc-C1": (torch.empty(2, 1, 3, 4, memory_format=torch.channels_last).normal_(generator=g), 1),
        "nchw-1x1-as-nhwc": (permuted((1, 6, 1, 3), (0, 2, 3, 1)).transpose(2, 3), 3),
        "ncdhw": (permuted((2, 4, 2, 3, 2), (0, 1, 2, 3, 4)), 2),
        "ndhwc": (permuted((2, 4, 2, 3, 2), (0, 2, 3, 4, 1)), 2),
        "ndhwc-strided": (permuted((2, 4, 2, 3, 4), (0, 2, 3, 4, 1))[..., ::2], 2),
        "ndhwc-1x1x1": (permuted((2, 4, 1, 1, 1), (0, 2, 3, 4, 1)), 2),
    }[layout]
    return x.to(device), groups


LAYOUTS = ["ncl", "ncl-t", "ncl-strided", "nchw", "nhwc", "nhwc-strided", "nhwc-1x1", "nhwc-Hx1", "nhwc-N1", "nhwc-C1",
           "nchw-1x1-as-nhwc", "ncdhw", "ndhwc", "ndhwc-strided", "ndhwc-1x1x1"]


@pytest.mark.parametrize("device,backend", backend_params("group_norm"))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_output_layout_is_torch(device, backend, layout):
    """The output has F.group_norm's memory format and strides (channels_last(_3d) where the input's strides
    are, contiguous otherwise), with the fused extras too; gradients flow through every layout."""
    x, groups = layout_input(layout, device)
    n, c = x.shape[:2]
    g = torch.Generator().manual_seed(6)
    kw = {k: torch.randn(shape, generator=g).to(device) for k, shape in
          (("weight", (c,)), ("bias", (c,)), ("add", (n, c)), ("scale", (n, c)), ("shift", (n, c)))}
    want = F.group_norm(x, groups, kw["weight"], kw["bias"])
    x = x.requires_grad_()
    with vlfast.use_backend(backend):
        plain = group_norm(x.detach(), groups, kw["weight"], kw["bias"])
        out = group_norm(x, groups, **kw, activation="gelu")
        again = group_norm(x.detach(), groups, kw["weight"], kw["bias"])  # the planned path
    for got in (plain, out, again):
        assert got.stride() == want.stride(), (tuple(x.shape), x.stride(), got.stride(), want.stride())
    assert_close(again, want, torch.float32, rtol=1e-4, atol=1e-4)
    assert_close(out, ref.group_norm(x.detach().double(), groups, **{k: v.double() for k, v in kw.items()},
                                     activation="gelu", compute_dtype=torch.float64), torch.float32,
                 rtol=1e-4, atol=1e-4)
    out.sum().backward()
    want_dx = torch.autograd.grad(ref.group_norm(x, groups, **kw, activation="gelu").sum(), x)[0]
    assert_close(x.grad, want_dx, torch.float32, rtol=2e-4, atol=2e-4, name="grad input")


@pytest.mark.parametrize("device,backend", backend_params("group_norm"))
def test_batch_zero_and_rank3(device, backend):
    x, add = torch.randn(3, 6, 11, device=device), torch.randn(3, 6, device=device)
    with vlfast.use_backend(backend):
        empty = group_norm(torch.randn(0, 4, 3, 3, device=device), 2, activation="silu")
        seq = group_norm(x, 3, add=add)
    assert empty.shape == (0, 4, 3, 3)
    assert_close(seq, ref.group_norm(x.double(), 3, add=add.double(), compute_dtype=torch.float64), torch.float32,
                 rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device,backend", backend_params("group_norm"))
def test_nan_propagates_to_its_group_only(device, backend):
    x = torch.randn(2, 4, 3, 3, device=device)
    x[1, 0, 1, 1] = float("nan")
    with vlfast.use_backend(backend):
        out = group_norm(x, 2, activation="silu")
    assert out[1, :2].isnan().all() and not out[0].isnan().any() and not out[1, 2:].isnan().any()


def test_module_is_a_drop_in():
    torch_gn = torch.nn.GroupNorm(4, 8)
    with torch.no_grad():
        torch_gn.weight.normal_()
        torch_gn.bias.normal_()
    gn = vlfast.nn.GroupNorm(4, 8, activation="silu")
    gn.load_state_dict(torch_gn.state_dict())
    assert isinstance(gn, torch.nn.GroupNorm) and gn.state_dict().keys() == torch_gn.state_dict().keys()
    x, temb = torch.randn(2, 8, 5, 5), torch.randn(2, 8)
    assert_close(gn(x, add=temb), F.silu(torch_gn(x + temb[:, :, None, None])), torch.float32, rtol=1e-5, atol=1e-5)
    plain = vlfast.nn.GroupNorm(4, 8, affine=False)
    assert_close(plain(x), F.group_norm(x, 4, eps=1e-5), torch.float32, rtol=1e-5, atol=1e-5)


def test_convert_swaps_instances_and_keeps_parameters():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.SiLU())
    x = torch.randn(2, 3, 9, 9)
    want = model(x)
    vlfast.nn.convert(model)
    assert type(model[1]) is vlfast.nn.GroupNorm and model[1].weight is model[1].weight
    assert_close(model(x), want, torch.float32, rtol=1e-5, atol=1e-5)


BAD = [
    (dict(num_groups=3), ValueError, "num_groups"),
    (dict(num_groups=0), ValueError, "num_groups"),
    (dict(input=torch.ones(2, 8, 3, 3, dtype=torch.int32)), TypeError, "input"),
    (dict(input=torch.ones(8)), ValueError, "input"),
    (dict(weight=torch.ones(7)), ValueError, "weight"),
    (dict(bias=torch.ones(8, 1)), ValueError, "bias"),
    (dict(add=torch.ones(2, 7)), ValueError, "add"),
    (dict(scale=torch.ones(8)), ValueError, "scale"),
    (dict(shift=torch.ones(2, 8, dtype=torch.int64)), TypeError, "shift"),
    (dict(activation="tanh"), ValueError, "activation"),
]


@pytest.mark.parametrize("bad,exc,word", BAD, ids=[f"{w}-{i}" for i, (_, _, w) in enumerate(BAD)])
def test_bad_input(bad, exc, word):
    args = dict(input=torch.ones(2, 8, 3, 3), num_groups=4)
    args.update(bad)
    with pytest.raises(exc, match=word):
        group_norm(args.pop("input"), args.pop("num_groups"), **args)


@pytest.mark.parametrize("device,backend", backend_params("group_norm"))
@pytest.mark.parametrize("eps", [0.0, -1e-3])
def test_nonpositive_eps_behaves_as_torch(device, backend, eps):
    x = torch.randn(2, 4, 3, 3, device=device)
    x[0, :2] = 1.0  # a constant group: zero variance (NaN where torch gives NaN)
    want = F.group_norm(x, 2, eps=eps)
    got = group_norm(x, 2, eps=eps, backend=backend)
    assert torch.equal(got.isnan(), want.isnan())
    assert_close(got.nan_to_num(), want.nan_to_num(), torch.float32, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device,backend", backend_params("group_norm"))
def test_opcheck(device, backend):
    x, kw = make((2, 4, 3, 3), 2, torch.float32, device, "all-gelu")
    args = (x, 2, kw["weight"], kw["bias"], 1e-5, kw["add"], kw["scale"], kw["shift"], 3, backend)
    torch.library.opcheck(torch.ops.vlfast.group_norm_fwd.default, args)


def test_compile_fullgraph():
    x, kw = make((2, 8, 4, 4), 4, torch.float32, "cpu", "ddpm")
    torch.use_deterministic_algorithms(False)

    def f(x):
        return group_norm(x, 4, **kw) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), f(x), torch.float32)


def test_auto_picks_forward_and_backward_backends_apart(monkeypatch):
    # Under auto, the backward takes the fastest backward backend, which may differ from the forward's.
    from vlfast.ops.group_norm import OP
    monkeypatch.setattr(OP, "order", lambda direction, inputs: ("reference",) if direction == "forward"
                        else ("triton", "reference"))
    x, kw = make((2, 8, 3, 3), 4, torch.float32, "cpu", "ddpm")
    x.requires_grad_()
    group_norm(x, 4, **kw).sum().backward()
    assert vlfast.last_backend("group_norm") == "reference"
    assert vlfast.last_backend("group_norm", "backward") == "triton"
    want = torch.autograd.grad(ref.group_norm(x, 4, **kw).sum(), x)[0]
    assert_close(x.grad, want, torch.float32, rtol=1e-4, atol=1e-4)
    with vlfast.use_backend("reference"):  # a forced backend runs both directions
        group_norm(x, 4, **kw).sum().backward()
    assert vlfast.last_backend("group_norm", "backward") == "reference"
    with vlfast.use_backend("cpp"):  # cpp's backward: aten's CPU kernels around the fused extras
        group_norm(x, 4, **kw).sum().backward()
    assert vlfast.last_backend("group_norm") == "cpp" and vlfast.last_backend("group_norm", "backward") == "cpp"
    with vlfast.use_backend("cpp+reference"):  # both named
        group_norm(x, 4, **kw).sum().backward()
    assert vlfast.last_backend("group_norm", "backward") == "reference"


@pytest.mark.parametrize("device,backend", backend_params("group_norm"))
def test_repeated_geometry_takes_the_planned_path(device, backend):
    """Eager inference caches its checks and launch plan per geometry: later calls with fresh data, a
    non-dense input and other backends still give fresh, correct outputs and report their backend."""
    import importlib
    gn_module = importlib.import_module("vlfast.ops.group_norm")
    shape, groups = (2, 8, 7, 10), 4
    x1, kw = make(shape, groups, torch.float32, device, "ddpm")
    x2, _ = make(shape, groups, torch.float32, device, "ddpm", seed=1)
    y1 = group_norm(x1, groups, **kw, backend=backend)
    keep = y1.clone()
    y2 = group_norm(x2, groups, **kw, backend=backend)  # the planned path
    assert vlfast.last_backend("group_norm") == backend and len(gn_module.OP.plans) > 0
    assert y2.data_ptr() != y1.data_ptr() and torch.equal(y1, keep)
    for x, y in ((x1, y1), (x2, y2)):
        assert_close(y, ref.group_norm(x.double(), groups, **{k: v if not torch.is_tensor(v) else v.double()
                                                              for k, v in kw.items()}), torch.float32)
    strided = x2[..., ::2]  # not dense: copied to contiguous on both paths
    for _ in range(2):
        got = group_norm(strided, groups, **kw, backend=backend)
        want = ref.group_norm(strided.double(), groups, **{k: v if not torch.is_tensor(v) else v.double()
                                                            for k, v in kw.items()})
        assert_close(got, want, torch.float32)
    group_norm(x1, groups, **kw, backend="reference")
    assert vlfast.last_backend("group_norm") == "reference"


def test_planned_path_still_rejects_bad_arguments():
    x, kw = make((2, 8, 3, 3), 4, torch.float32, "cpu", "ddpm")
    for _ in range(2):
        group_norm(x, 4, **kw)  # plan cached for this geometry
    with pytest.raises(ValueError, match="num_groups"):
        group_norm(x, True, **kw)  # equal to 1 as a dict key, still rejected
    with pytest.raises(ValueError, match="add"):
        group_norm(x, 4, **dict(kw, add=kw["add"][:1]))
    with pytest.raises(ValueError, match="activation"):
        group_norm(x, 4, **dict(kw, activation=["silu"]))
    with pytest.raises(TypeError, match="weight"):
        group_norm(x, 4, **dict(kw, weight=[1.0] * 8))


def test_module_calls_take_the_planned_path():
    """nn.Parameter weights count as plain tensors: a module's repeated calls reuse one plan."""
    import importlib
    gn_module = importlib.import_module("vlfast.ops.group_norm")
    m = vlfast.nn.GroupNorm(4, 8, activation="silu")
    x = torch.randn(2, 8, 5, 5)
    gn_module.OP.plans.clear()
    with torch.no_grad():
        y1 = m(x)
        y2 = m(x)
    assert len(gn_module.OP.plans) == 1 and torch.equal(y1, y2)
    y3 = m(x)  # records gradients: a second plan, same result
    assert len(gn_module.OP.plans) == 2 and torch.equal(y3.detach(), y1)
