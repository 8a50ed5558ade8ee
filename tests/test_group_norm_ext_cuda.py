"""The CUDA kernels torch.ops.vlfast.group_norm_fwd_kernel and group_norm_bwd_kernel against the float64 reference.

Forward: ``(input, num_groups, weight, bias, eps, add, scale, shift, activation) -> (out, mean, rstd)``;
backward: ``(grad_out, input, num_groups, weight, bias, add, scale, shift, activation, mean, rstd, needs)
-> [dinput, dweight, dbias, dadd, dscale, dshift]`` (an empty (0,) tensor where not needed). The spec is
vlfast/reference/group_norm.py. The forward path is forced with the private knob ``group_norm_cuda_path``
of vlfast.ops._overrides ("onepass", "split"; "auto" or unset: chosen from the shape), which sets it in the
extension (torch.ops.vlfast.group_norm_set_cuda_path). Skipped without a GPU or without the extension's
CUDA kernels.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from vlfast.activations import CODE as ACT_CODE
from vlfast.ops import _overrides
from vlfast.reference.group_norm import group_norm as reference
from vlfast.testing import assert_close, assert_low_precision_close, torch_group_norm

from conftest import DT, GN_GRADS, GN_PATTERNS

try:
    from vlfast import _C
except ImportError:
    _C = None

HAS_CUDA_OPS = (torch.cuda.is_available() and bool(getattr(_C, "WITH_CUDA", False))
                and hasattr(torch.ops.vlfast, "group_norm_bwd_kernel"))
pytestmark = [pytest.mark.skipif(not HAS_CUDA_OPS, reason="needs a GPU and vlfast._C built with CUDA"),
              pytest.mark.usefixtures("poison_empty")]

PATHS = ("onepass", "split")
ACTS = ACT_CODE
GRADS = GN_GRADS
PARAMS = ("weight", "bias", "add", "scale", "shift")
PATTERNS = GN_PATTERNS


# ---------------------------------------------------------------- helpers
def forced(path):
    """Run the forward on ``path`` ("onepass", "split" or "auto") inside the block."""
    return _overrides.use(group_norm_cuda_path=path)


def make_inputs(shape, dtype, layout="nchw", pattern="ddpm", affine=True, param_dtype=None, offset=1.5, seed=0):
    """(x, params, activation) on the GPU; layout "nhwc": channels_last (channels_last_3d at rank 5)."""
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    pdt = param_dtype or dtype
    x = (torch.randn(shape, generator=g) * 2 + offset).to("cuda", dtype)
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    kw = dict.fromkeys(PARAMS)
    if affine:
        kw["weight"] = (torch.rand(c, generator=g) + 0.5).to("cuda", pdt)
        kw["bias"] = torch.randn(c, generator=g).to("cuda", pdt)
    names, act = PATTERNS[pattern]
    for name in names:
        t = torch.randn(n, c, generator=g) * (0.5 if name == "scale" else 1.0)
        if name in ("scale", "shift"):  # as AdaGN's emb.chunk(2, dim=1): row stride 2C
            t = torch.cat([t, torch.randn(n, c, generator=g)], dim=1)[:, :c]
        kw[name] = t.to("cuda", pdt)
    return x, kw, act


def fwd(x, groups, kw, act, eps=1e-5, path="auto"):
    with forced(path):
        return torch.ops.vlfast.group_norm_fwd_kernel(x, groups, kw["weight"], kw["bias"], eps, kw["add"],
                                                      kw["scale"], kw["shift"], ACTS[act])


def bwd(dy, x, groups, kw, act, mean, rstd, needs=(True,) * 6):
    return torch.ops.vlfast.group_norm_bwd_kernel(dy, x, groups, kw["weight"], kw["bias"], kw["add"], kw["scale"],
                                                  kw["shift"], ACTS[act], mean, rstd, list(needs))


def reference_grads(x, groups, kw, act, dy, compute_dtype, eps=1e-5):
    """(out, grads in GRADS order, None where absent) by autograd: of the reference computed in compute_dtype
    (float64, float32), or of PyTorch's own composition in x's dtype (F.group_norm and modules) for fp16/bf16."""
    up = (lambda t: t.double()) if compute_dtype == torch.float64 else (lambda t: t)
    leaves = [up(x).detach().requires_grad_()]
    leaves += [None if kw[k] is None else up(kw[k]).detach().requires_grad_() for k in PARAMS]
    if compute_dtype in (torch.float16, torch.bfloat16):
        out = torch_group_norm(leaves[0], groups, leaves[1], leaves[2], eps, add=leaves[3], scale=leaves[4],
                               shift=leaves[5], activation=act)
    else:
        out = reference(leaves[0], groups, leaves[1], leaves[2], eps, add=leaves[3], scale=leaves[4],
                        shift=leaves[5], activation=act, compute_dtype=compute_dtype)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, present, up(dy)))
    return out.detach(), [None if t is None else next(grads) for t in leaves]


def torch_stats(x, groups, kw, eps=1e-5):
    """(mean, rstd) of x + add by aten's native_group_norm in float64."""
    h = x.double()
    if kw["add"] is not None:
        h = h + kw["add"].double().reshape(kw["add"].shape + (1,) * (x.dim() - 2))
    n, c = x.shape[:2]
    _, mean, rstd = torch.native_group_norm(h.contiguous(), None, None, n, c, math.prod(x.shape[2:]), groups, eps)
    return mean, rstd


def check(got, hi, lo, name, loose=False):
    """fp32: the tolerance table (loose: relative to the tensor's largest value, for long sums);
    fp16/bf16: at most twice PyTorch's own error (lo) plus atol."""
    assert got.dtype == lo.dtype and got.shape == hi.shape, name
    if got.dtype == torch.float32:
        if loose:
            scale = max(1.0, hi.abs().max().item())
            assert_close(got, hi, torch.float32, rtol=1e-4, atol=1e-4 * scale, name=name)
        else:
            assert_close(got, hi, torch.float32, name=name)
    else:
        assert_low_precision_close(got, hi, lo, name=name)


def check_forward(x, groups, kw, act, path="auto", eps=1e-5, loose=False):
    out, mean, rstd = fwd(x, groups, kw, act, eps, path)
    n = x.shape[0]
    assert out.dtype == x.dtype and out.shape == x.shape and out.stride() == x.stride(), "out must keep x's layout"
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (n, groups)
    cast = (lambda t: None if t is None else t.double())  # noqa: E731
    hi = reference(x.double(), groups, cast(kw["weight"]), cast(kw["bias"]), eps, add=cast(kw["add"]),
                   scale=cast(kw["scale"]), shift=cast(kw["shift"]), activation=act, compute_dtype=torch.float64)
    lo = hi.float() if x.dtype == torch.float32 else torch_group_norm(
        x, groups, kw["weight"], kw["bias"], eps, add=kw["add"], scale=kw["scale"], shift=kw["shift"], activation=act)
    check(out, hi, lo, f"out ({path})", loose)
    if x.numel():
        m64, r64 = torch_stats(x, groups, kw, eps)
        assert_close(mean, m64, torch.float32, rtol=1e-5, atol=1e-5, name="mean")
        assert_close(rstd, r64, torch.float32, rtol=1e-5, atol=1e-5, name="rstd")
    return out, mean, rstd


def check_all(x, groups, kw, act, path="auto", loose=False, seed=1):
    """Forward on ``path`` and the backward from its statistics, against the reference."""
    _, mean, rstd = check_forward(x, groups, kw, act, path, loose=loose)
    g = torch.Generator().manual_seed(seed)
    dy = torch.empty_like(x).copy_(torch.randn(x.shape, generator=g))
    grads = bwd(dy, x, groups, kw, act, mean, rstd)
    _, ghi = reference_grads(x, groups, kw, act, dy, torch.float64)
    _, glo = reference_grads(x, groups, kw, act, dy, torch.float32 if x.dtype == torch.float32 else x.dtype)
    present = (x,) + tuple(kw[k] for k in PARAMS)
    assert len(grads) == 6
    for name, got, t, want_hi, want_lo in zip(GRADS, grads, present, ghi, glo):
        if t is None:
            assert got.shape == (0,) and got.dtype == x.dtype, name
        else:
            assert got.dtype == t.dtype and got.shape == t.shape, name
            check(got, want_hi, want_lo.to(got.dtype), name, loose)
    assert grads[0].stride() == x.stride(), "dx must keep x's layout"


def sid(shape, groups):
    return "N{}-C{}-G{}-S{}".format(shape[0], shape[1], groups, "x".join(map(str, shape[2:])) or "1")


def case(shape, groups, dtype=torch.float32, layout="nchw", pattern="ddpm", affine=True):
    pid = f"{sid(shape, groups)}-{DT[dtype]}-{layout}-{pattern}{'' if affine else '-noaffine'}"
    return pytest.param(shape, groups, dtype, layout, pattern, affine, id=pid)


# ---------------------------------------------------------------- the grid
CASES = [
    # every pattern, fp32 NCHW
    *[case((2, 8, 5, 7), 4, pattern=p) for p in PATTERNS],
    # weight/bias absent
    case((2, 8, 5, 7), 4, pattern="plain", affine=False),
    case((2, 8, 5, 7), 2, layout="nhwc", pattern="adm", affine=False),
    # low precision, both layouts, 16-byte vectors (C and S multiples of 8) and single elements (primes)
    *[case(shape, 4, dt, lay, pat) for dt in (torch.float16, torch.bfloat16)
      for lay, pat in (("nchw", "ddpm"), ("nhwc", "adm")) for shape in ((2, 16, 8, 8), (2, 12, 7, 13))],
    # channels_last, G = 1 and G = C, spatial 1x1, primes, N = 1
    case((2, 8, 5, 7), 4, layout="nhwc", pattern="all-relu"),
    case((2, 6, 4, 3), 1, pattern="all-relu"),
    case((2, 6, 4, 3), 1, layout="nhwc", pattern="ddpm"),
    case((2, 6, 4, 3), 6, pattern="adm"),
    case((2, 6, 4, 3), 6, layout="nhwc", pattern="scale-gelu"),
    case((3, 8, 1, 1), 4, pattern="adm"),
    case((3, 8, 1, 1), 8, layout="nhwc", pattern="ddpm"),
    case((1, 4, 7, 13), 2, pattern="ddpm"),
    case((1, 12, 11, 3), 2, layout="nhwc", pattern="adm"),
    case((1, 64, 16, 16), 32, torch.float16, "nhwc", "ddpm"),
    case((4, 96, 12, 12), 32, torch.bfloat16, "nchw", "all-relu"),
    # rank 3, rank 5 channels_last_3d, rank 2
    case((2, 8, 13), 4, pattern="ddpm"),
    case((2, 4, 3, 2, 5), 2, layout="nhwc", pattern="ddpm"),
    case((5, 6), 2, pattern="adm"),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape,groups,dtype,layout,pattern,affine", CASES)
def test_forward_backward(shape, groups, dtype, layout, pattern, affine, path):
    x, kw, act = make_inputs(shape, dtype, layout, pattern, affine)
    check_all(x, groups, kw, act, path)


@pytest.mark.parametrize("act", list(ACTS), ids=str)
@pytest.mark.parametrize("add,scale,shift", list(itertools.product([False, True], repeat=3)),
                         ids=lambda v: "y" if v else "n")
@pytest.mark.parametrize("weight,bias", [(True, True), (False, False), (True, False), (False, True)],
                         ids=["wb", "none", "w", "b"])
def test_every_combination(weight, bias, add, scale, shift, act):
    """Each of weight, bias, add, scale, shift present or absent, each activation: both paths, both layouts."""
    for path, layout in itertools.product(PATHS, ("nchw", "nhwc")):
        x, kw, _ = make_inputs((2, 12, 6, 5), torch.float32, layout, "all-relu")
        for k, on in zip(PARAMS, (weight, bias, add, scale, shift)):
            kw[k] = kw[k] if on else None
        check_all(x, 3, kw, act, path)


# Groups beyond shared memory (split even when one-pass is asked), one-pass groups over 48 KB (the opt-in
# shared memory), and the split path with many chunks per channel.
BIG = [
    case((1, 4, 160, 160), 1, torch.float32, "nchw", "ddpm"),
    case((1, 4, 160, 160), 1, torch.float16, "nhwc", "adm"),
    case((2, 128, 32, 32), 4, torch.bfloat16, "nhwc", "ddpm"),
    case((2, 16, 32, 32), 1, torch.float32, "nhwc", "all-relu"),
    case((2, 32, 32, 32), 1, torch.float16, "nchw", "scale-gelu"),
    case((1, 2, 509, 257), 2, torch.float32, "nchw", "adm"),
]


@pytest.mark.parametrize("path", PATHS + ("auto",))
@pytest.mark.parametrize("shape,groups,dtype,layout,pattern,affine", BIG)
def test_large_groups(shape, groups, dtype, layout, pattern, affine, path):
    x, kw, act = make_inputs(shape, dtype, layout, pattern, affine)
    check_all(x, groups, kw, act, path, loose=True)


def test_forced_path_reaches_the_extension_and_is_restored():
    path = torch.ops.vlfast.group_norm_cuda_path
    assert path() == 0
    with forced("split"):
        assert path() == 2
        with forced("onepass"):
            assert path() == 1
        with _overrides.use(group_norm_cuda_path=None):  # unset inside: auto
            assert path() == 0
        assert path() == 2
    assert path() == 0


def test_auto_path_matches_a_forced_one():
    """Many small groups run the one-pass kernel; one huge group the split kernels (bit-identical to forcing them)."""
    for shape, groups, path in (((64, 64, 8, 8), 32, "onepass"), ((1, 4, 160, 160), 1, "split")):
        x, kw, act = make_inputs(shape, torch.float16, "nhwc", "adm")
        auto, forced_ = fwd(x, groups, kw, act), fwd(x, groups, kw, act, path=path)
        for a, b in zip(auto, forced_):
            assert torch.equal(a, b), (shape, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_large_offset(path, layout):
    """Statistics of x - K (K the group's first element): a mean 10^4 times the spread costs no precision."""
    x, kw, act = make_inputs((2, 8, 32, 32), torch.float32, layout, "plain", offset=1e4)
    check_forward(x, 2, kw, act, path)


@pytest.mark.parametrize("path", PATHS)
def test_parameter_dtypes_may_differ(path):
    """weight/bias/add/scale/shift of any float dtype, independent of the input's; grads come back in each's."""
    x, kw, act = make_inputs((2, 8, 6, 6), torch.bfloat16, "nchw", "all-relu", param_dtype=torch.float64)
    kw["bias"], kw["add"], kw["scale"], kw["weight"] = (kw["bias"].half(), kw["add"].bfloat16(), kw["scale"].float(),
                                                        kw["weight"].float())
    out, mean, rstd = fwd(x, 2, kw, act, path=path)
    want = fwd(x, 2, {k: None if v is None else v.float() for k, v in kw.items()}, act, path=path)
    assert torch.equal(out, want[0])
    dy = torch.randn_like(x)
    grads = bwd(dy, x, 2, kw, act, mean, rstd)
    for name, got, t in zip(GRADS, grads, (x,) + tuple(kw[k] for k in PARAMS)):
        assert got.dtype == t.dtype and got.shape == t.shape, name


@pytest.mark.parametrize("path", PATHS)
def test_deterministic(path):
    """Fixed-order sums, no atomics: two runs are bit-identical, forward and backward."""
    for shape, groups, layout in (((2, 64, 48, 48), 8, "nchw"), ((3, 96, 40, 40), 32, "nhwc")):
        x, kw, act = make_inputs(shape, torch.float32, layout, "all-relu")
        dy = torch.randn_like(x)
        runs = []
        for _ in range(2):
            out, mean, rstd = fwd(x, groups, kw, act, path=path)
            runs.append([out, mean, rstd] + bwd(dy, x, groups, kw, act, mean, rstd))
        for a, b in zip(*runs):
            assert torch.equal(a, b), (shape, layout)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_nan_stays_in_its_group(path, layout):
    x, kw, act = make_inputs((2, 8, 5, 7), torch.float32, layout, "ddpm")
    x[1, 3, 2, 4] = float("nan")  # sample 1, group 1 (channels 2, 3)
    out, mean, rstd = fwd(x, 4, kw, act, path=path)
    assert out[1, 2:4].isnan().all() and mean[1, 1].isnan() and rstd[1, 1].isnan()
    out[1, 2:4] = 0.0
    mean[1, 1] = rstd[1, 1] = 0.0
    assert not out.isnan().any() and not mean.isnan().any() and not rstd.isnan().any()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("eps", [0.0, -1e-3])
def test_nonpositive_eps_as_torch(path, eps):
    """rsqrt(var + eps) as F.group_norm: a constant group gives inf / NaN, the others normalise."""
    x = torch.randn(2, 4, 3, 3, device="cuda")
    x[0, :2] = 1.5
    out, mean, rstd = fwd(x, 2, dict.fromkeys(PARAMS), None, eps, path)
    expected = F.group_norm(x.double(), 2, eps=eps)
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    ok = ~torch.isnan(expected)
    assert_close(out[ok], expected[ok].float(), torch.float32)


def test_empty():
    """N = 0: empty outputs, zero dweight/dbias; empty spatial: NaN statistics (as the CPU kernel)."""
    x, kw, act = make_inputs((0, 8, 3, 3), torch.float32, "nchw", "adm")
    out, mean, rstd = fwd(x, 4, kw, act)
    assert out.shape == x.shape and mean.shape == rstd.shape == (0, 4)
    dx, dw, db, dadd, dscale, dshift = bwd(torch.empty_like(x), x, 4, kw, act, mean, rstd)
    assert dx.shape == x.shape and dscale.shape == dshift.shape == (0, 8) and dadd.shape == (0,)
    assert torch.equal(dw, torch.zeros_like(dw)) and torch.equal(db, torch.zeros_like(db))
    x, kw, act = make_inputs((2, 8, 0, 3), torch.float16, "nchw", "all-relu")
    out, mean, rstd = fwd(x, 4, kw, act)
    assert out.shape == x.shape and mean.isnan().all() and rstd.isnan().all()
    dx, dw, db, dadd, dscale, dshift = bwd(torch.empty_like(x), x, 4, kw, act, mean, rstd)
    assert dx.shape == x.shape and dadd.shape == (2, 8) and not dadd.any() and not dw.any() and not dshift.any()


def test_grad_layout_and_needs():
    """dy in another layout or dtype is matched to x's; only the requested grads come back."""
    x, kw, act = make_inputs((2, 8, 5, 3), torch.float32, "nhwc", "all-relu")
    dy = torch.randn(x.shape, device="cuda", dtype=torch.float64)  # NCHW, float64, while x is channels_last fp32
    _, mean, rstd = fwd(x, 2, kw, act)
    _, want = reference_grads(x, 2, kw, act, dy.float(), torch.float64)
    for needs in [(True, False, False, False, False, False), (False, True, False, True, False, True),
                  (False, False, True, False, True, False), (False,) * 6]:
        got = bwd(dy, x, 2, kw, act, mean, rstd, needs)
        for name, need, g, w in zip(GRADS, needs, got, want):
            if need:
                assert_close(g, w, torch.float32, name=name)
            else:
                assert g.shape == (0,) and g.dtype == x.dtype, name
        if needs[0]:
            assert got[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("path", PATHS)
def test_cuda_graph_forward(path):
    """The forward captured in a CUDA graph and replayed on new data gives the eager result."""
    for shape, groups, dtype, layout in (((4, 32, 16, 16), 8, torch.float16, "nhwc"),
                                         ((2, 16, 32, 32), 1, torch.float32, "nchw")):
        x, kw, act = make_inputs(shape, dtype, layout, "adm")
        with forced(path):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graphs advises
                fwd(x, groups, kw, act, path=path)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static = fwd(x, groups, kw, act, path=path)
        x.copy_(torch.randn(shape, device="cuda", dtype=dtype) * 3 - 1)
        graph.replay()
        eager = fwd(x, groups, kw, act, path=path)
        for a, b in zip(static, eager):
            assert torch.equal(a, b), (shape, path)


def test_errors():
    x, kw, act = make_inputs((2, 6, 4, 4), torch.float32, "nchw", "plain")
    op = torch.ops.vlfast.group_norm_fwd_kernel
    with pytest.raises(RuntimeError, match="num_groups"):
        op(x, 4, None, None, 1e-5, None, None, None, 0)
    with pytest.raises(RuntimeError, match="weight"):
        op(x, 2, torch.ones(5, device="cuda"), None, 1e-5, None, None, None, 0)
    with pytest.raises(RuntimeError, match="add"):
        op(x, 2, None, None, 1e-5, torch.ones(6, device="cuda"), None, None, 0)
    with pytest.raises(RuntimeError, match="scale"):
        op(x, 2, None, None, 1e-5, None, torch.ones(2, 6), None, 0)  # on the CPU
    with pytest.raises(RuntimeError, match="contiguous"):
        op(x[:, :, ::2], 2, None, None, 1e-5, None, None, None, 0)
    with pytest.raises(RuntimeError, match="activation"):
        op(x, 2, None, None, 1e-5, None, None, None, 7)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        op(x.double(), 2, None, None, 1e-5, None, None, None, 0)
    with pytest.raises(ValueError, match="group_norm_cuda_path"):
        fwd(x, 2, kw, act, path="fast")
    with pytest.raises(RuntimeError, match="path"):
        torch.ops.vlfast.group_norm_set_cuda_path(3)
    _, mean, rstd = fwd(x, 2, kw, act)
    with pytest.raises(RuntimeError, match="needs"):
        bwd(x, x, 2, kw, act, mean, rstd, needs=(True,) * 5)
    with pytest.raises(RuntimeError, match="grad_out"):
        bwd(x[:1], x, 2, kw, act, mean, rstd)
    with pytest.raises(RuntimeError, match="mean"):
        bwd(x, x, 2, kw, act, mean[:1], rstd)


def test_opcheck():
    x, kw, act = make_inputs((2, 8, 4, 4), torch.float32, "nhwc", "all-relu")
    args = (x, 4, kw["weight"], kw["bias"], 1e-5, kw["add"], kw["scale"], kw["shift"], ACTS[act])
    torch.library.opcheck(torch.ops.vlfast.group_norm_fwd_kernel.default, args, test_utils=("test_schema",))
    _, mean, rstd = torch.ops.vlfast.group_norm_fwd_kernel(*args)
    dy = torch.randn_like(x)
    bargs = (dy, x, 4, kw["weight"], kw["bias"], kw["add"], kw["scale"], kw["shift"], ACTS[act], mean, rstd,
             [True, True, False, True, True, False])
    torch.library.opcheck(torch.ops.vlfast.group_norm_bwd_kernel.default, bargs, test_utils=("test_schema",))
