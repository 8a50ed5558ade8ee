"""The C++ CPU kernel torch.ops.vlfast.group_norm_fwd_kernel against the float64 reference.

The op: ``(input, num_groups, weight, bias, eps, add, scale, shift, activation) -> (out, mean, rstd)``,
activation 0 none, 1 silu, 2 relu, 3 gelu; the spec is vlfast/reference/group_norm.py.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

from vlfast.activations import CODE
from vlfast.reference.group_norm import group_norm as ref_group_norm
from vlfast.testing import assert_close, assert_low_precision_close, torch_group_norm

try:
    import vlfast._C  # noqa: F401
except ImportError:
    pass
if not hasattr(torch.ops.vlfast, "group_norm_fwd_kernel"):
    pytest.skip("vlfast._C has no group_norm_fwd_kernel", allow_module_level=True)

OP = torch.ops.vlfast.group_norm_fwd_kernel
ACTS = CODE
DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}

pytestmark = pytest.mark.usefixtures("poison_empty")


# ---------------------------------------------------------------- helpers
def make_input(shape, dtype, channels_last=False, seed=0, offset=0.0):
    """(N, C, *) input; channels_last: the (N, *, C) permutation is contiguous (channels_last at rank 4)."""
    g = torch.Generator().manual_seed(seed)
    n, c, *spatial = shape
    x = torch.randn(n, *spatial, c, generator=g) * 2 + offset
    x = x.movedim(-1, 1) if channels_last else x.movedim(-1, 1).contiguous()
    return x.to(dtype)


def make_params(n, c, pattern, seed=1, dtype=torch.float32):
    """weight, bias, add, scale, shift as the pattern asks for; the rest None."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: (torch.randn(*s, generator=g)).to(dtype)  # noqa: E731
    p = dict(weight=rand(c) * 0.5 + 1, bias=rand(c), add=rand(n, c), scale=rand(n, c) * 0.3, shift=rand(n, c))
    return {k: (v if pattern.get(k, False) else None) for k, v in p.items()}


def run(x, groups, p, activation, eps=1e-5):
    return OP(x, groups, p["weight"], p["bias"], eps, p["add"], p["scale"], p["shift"], ACTS[activation])


def reference(x, groups, p, activation, eps=1e-5, dtype=torch.float64):
    """The reference computed in ``dtype``, all inputs cast to it."""
    cast = (lambda t: None if t is None else t.to(dtype))  # noqa: E731
    return ref_group_norm(x.to(dtype), groups, cast(p["weight"]), cast(p["bias"]), eps, add=cast(p["add"]),
                          scale=cast(p["scale"]), shift=cast(p["shift"]), activation=activation,
                          compute_dtype=dtype)


def torch_stats(x, groups, p, eps=1e-5):
    """(mean, rstd) of x + add from aten's native_group_norm in float64."""
    h = x.double()
    if p["add"] is not None:
        h = h + p["add"].double().reshape(p["add"].shape + (1,) * (x.dim() - 2))
    n, c = x.shape[:2]
    _, mean, rstd = torch.ops.aten.native_group_norm(h.contiguous(), None, None, n, c, h[0, 0].numel(), groups, eps)
    return mean, rstd


def check(x, groups, p, activation, eps=1e-5, name=""):
    out, mean, rstd = run(x, groups, p, activation, eps)
    n = x.shape[0]
    assert out.dtype == x.dtype and out.shape == x.shape and out.stride() == x.stride(), name
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert mean.dtype == rstd.dtype == stat_dtype and mean.shape == rstd.shape == (n, groups), name
    hi = reference(x, groups, p, activation, eps)
    if x.dtype in (torch.float32, torch.float64):
        assert_close(out, hi, x.dtype, name=f"{name} out")
    else:
        # PyTorch's own error in this dtype: F.group_norm and modules computing in it.
        lo = torch_group_norm(x, groups, p["weight"], p["bias"], eps, add=p["add"], scale=p["scale"],
                              shift=p["shift"], activation=activation)
        assert_low_precision_close(out, hi, lo, name=f"{name} out")
    if n:
        m64, r64 = torch_stats(x, groups, p, eps)
        tol = (1e-10, 1e-12) if x.dtype == torch.float64 else (1e-5, 1e-5)
        torch.testing.assert_close(mean.double(), m64, rtol=tol[0], atol=tol[1], msg=lambda m: f"{name} mean: {m}")
        torch.testing.assert_close(rstd.double(), r64, rtol=tol[0], atol=tol[1], msg=lambda m: f"{name} rstd: {m}")
    return out, mean, rstd


# ---------------------------------------------------------------- the grid
# (shape, groups): typical, primes, spatial 1x1 with G = C, G = 1, a large group, three-phase with 2 threads
# (N * G = 3), channels-last fused (N = 4), N = 0, rank 3, rank 5, rank 2.
SHAPES = [
    ((2, 64, 8, 8), 32), ((3, 6, 7, 5), 2), ((2, 8, 1, 1), 8), ((2, 12, 5, 5), 1), ((1, 8, 128, 128), 1),
    ((3, 4, 64, 64), 1), ((4, 32, 16, 16), 8), ((0, 8, 4, 4), 2), ((2, 16, 33), 4), ((2, 8, 3, 4, 5), 4),
    ((4, 16), 4),
]
PATTERNS = {
    "plain": dict(),
    "affine-relu": dict(weight=True, bias=True, act="relu"),
    "ddpm": dict(weight=True, bias=True, add=True, act="silu"),
    "adm": dict(weight=True, bias=True, scale=True, shift=True, act="silu"),
    "weight-all-gelu": dict(weight=True, add=True, scale=True, shift=True, act="gelu"),
    "bias-shift": dict(bias=True, shift=True),
}


def shape_id(shape, groups):
    return "N{}-C{}-G{}-{}".format(shape[0], shape[1], groups, "x".join(map(str, shape[2:])) or "1")


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: DT[d])
@pytest.mark.parametrize("shape,groups", [pytest.param(s, g, id=shape_id(s, g)) for s, g in SHAPES])
def test_against_reference(shape, groups, dtype, layout, pattern):
    pat = PATTERNS[pattern]
    x = make_input(shape, dtype, channels_last=layout == "channels_last")
    check(x, groups, make_params(shape[0], shape[1], pat), pat.get("act"), name=f"{shape} {layout} {pattern}")


@pytest.mark.parametrize("act", list(ACTS), ids=lambda a: str(a))
@pytest.mark.parametrize("add,scale,shift", list(itertools.product([False, True], repeat=3)))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_every_combination(add, scale, shift, act, layout):
    x = make_input((2, 12, 6, 5), torch.float32, channels_last=layout == "channels_last")
    p = make_params(2, 12, dict(weight=True, bias=True, add=add, scale=scale, shift=shift))
    check(x, 3, p, act)


def test_float64():
    x = make_input((2, 8, 9, 7), torch.float64)
    p = make_params(2, 8, dict(weight=True, bias=True, add=True, scale=True, shift=True), dtype=torch.float64)
    for act in ACTS:
        check(x, 4, p, act, name=str(act))


def test_parameter_dtypes_may_differ():
    """weight/bias/add/scale/shift of any float dtype, read as fp32, independent of the input's dtype."""
    x = make_input((2, 8, 6, 6), torch.bfloat16)
    p = make_params(2, 8, dict(weight=True, bias=True, add=True, scale=True, shift=True), dtype=torch.float64)
    p["bias"], p["add"], p["scale"] = p["bias"].half(), p["add"].bfloat16(), p["scale"].float()
    check(x, 2, p, "silu")


def test_large_offset():
    """Statistics by shifted sums: a mean 10^4 times the spread costs no precision (E[x^2] - E[x]^2 would)."""
    for layout in ("nchw", "channels_last"):
        x = make_input((2, 8, 32, 32), torch.float32, channels_last=layout == "channels_last", offset=1e4)
        check(x, 2, make_params(2, 8, dict(weight=True, bias=True)), None, name=layout)


def test_nan_stays_in_its_group():
    for act, layout in itertools.product(ACTS, ("nchw", "channels_last")):
        x = make_input((2, 8, 5, 5), torch.float32, channels_last=layout == "channels_last")
        x[0, 2, 3, 1] = float("nan")  # sample 0, group 1 of 4
        p = make_params(2, 8, dict(weight=True, bias=True, add=True))
        out, mean, rstd = run(x, 4, p, act)
        assert torch.isnan(out[0, 2:4]).all(), (act, layout)
        assert not torch.isnan(out[0, :2]).any() and not torch.isnan(out[0, 4:]).any() and not torch.isnan(out[1]).any()
        assert torch.isnan(mean[0, 1]) and torch.isnan(rstd[0, 1])
        assert torch.isfinite(mean[0, [0, 2, 3]]).all() and torch.isfinite(mean[1]).all()
        assert_close(out[1], reference(x, 4, p, act)[1].float(), torch.float32)


def test_zero_eps_constant_group_as_torch():
    """eps = 0 on a constant group: rstd = inf and the output NaN, as F.group_norm gives."""
    x = make_input((1, 4, 3, 3), torch.float32)
    x[0, :2] = 1.5
    out, mean, rstd = OP(x, 2, None, None, 0.0, None, None, None, 0)
    expected = F.group_norm(x.double(), 2, eps=0.0)
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    assert torch.isinf(rstd[0, 0]) and torch.isfinite(rstd[0, 1])


CASES_THREADS = [((1, 8, 128, 128), 1, "nchw"), ((3, 4, 64, 64), 1, "nchw"), ((1, 64, 32, 32), 32, "channels_last"),
                 ((3, 16, 64, 64), 4, "channels_last"), ((4, 32, 16, 16), 8, "nchw")]


@pytest.mark.parametrize("shape,groups,layout", CASES_THREADS, ids=lambda v: str(v))
def test_bit_identical_across_runs_and_threads(shape, groups, layout):
    x = make_input(shape, torch.float32, channels_last=layout == "channels_last")
    p = make_params(shape[0], shape[1], dict(weight=True, bias=True, add=True))
    first = run(x, groups, p, "silu")
    again = run(x, groups, p, "silu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run(x, groups, p, "silu")
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, again, single):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_errors():
    x = make_input((2, 6, 4, 4), torch.float32)
    p = make_params(2, 6, dict())
    with pytest.raises(RuntimeError, match="num_groups"):
        run(x, 4, p, None)
    with pytest.raises(RuntimeError, match="weight"):
        OP(x, 2, torch.ones(5), None, 1e-5, None, None, None, 0)
    with pytest.raises(RuntimeError, match="bias"):
        OP(x, 2, None, torch.ones(6, 1), 1e-5, None, None, None, 0)
    with pytest.raises(RuntimeError, match="add"):
        OP(x, 2, None, None, 1e-5, torch.ones(6), None, None, 0)
    with pytest.raises(RuntimeError, match="scale"):
        OP(x, 2, None, None, 1e-5, None, torch.ones(1, 6), None, 0)
    with pytest.raises(RuntimeError, match="contiguous"):
        run(x[:, :, ::2], 2, p, None)
    with pytest.raises(RuntimeError, match="activation"):
        OP(x, 2, None, None, 1e-5, None, None, None, 7)


def test_schema():
    x = make_input((2, 8, 4, 4), torch.float32)
    p = make_params(2, 8, dict(weight=True, bias=True, add=True))
    torch.library.opcheck(OP, (x, 4, p["weight"], p["bias"], 1e-5, p["add"], None, None, 1),
                          test_utils=("test_schema",))
