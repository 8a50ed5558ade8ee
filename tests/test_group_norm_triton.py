"""The Triton GroupNorm launchers (vlfast.ops.group_norm_triton) against the float64 reference.

CPU tensors under TRITON_INTERPRET=1 (set by conftest): small shapes; the split path is forced with
the private knobs of vlfast.ops._overrides (``group_norm_single_max=0`` and small tiles) so that its
loops and chunking run, and the groups per single-pass program with ``group_norm_groups_per_program``
(path ids ``gpp<k>``).
"""

import math

import pytest
import torch

from vlfast.ops import _overrides
from vlfast.ops import group_norm_triton as gnt
from vlfast.ops.group_norm_triton import group_norm_bwd, group_norm_fwd
from vlfast.reference.group_norm import group_norm as reference
from vlfast.testing import assert_close, assert_low_precision_close, torch_group_norm

from conftest import DT, GN_GRADS, GN_PATTERNS

pytestmark = pytest.mark.usefixtures("poison_empty")

GRADS = GN_GRADS
PATTERNS = dict(GN_PATTERNS, **{"add-relu": (("add",), "relu")})
# Knobs of vlfast.ops._overrides: several tiles per chunk, several chunks.
SPLIT = dict(group_norm_single_max=0, group_norm_split_tile=32, group_norm_split_programs=6)


def make_inputs(shape, groups, dtype, layout, pattern, affine=True, param_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    pdt = param_dtype or dtype
    x = (torch.randn(shape, generator=g) * 2 + 1.5).to(dtype)  # an offset mean: statistics must be shifted
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    elif layout == "ncl-t":  # (N, C, L) with unit channel stride
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    kw = {"weight": None, "bias": None, "add": None, "scale": None, "shift": None}
    if affine:
        kw["weight"] = (torch.rand(c, generator=g) + 0.5).to(pdt)
        kw["bias"] = torch.randn(c, generator=g).to(pdt)
    names, act = PATTERNS[pattern]
    for name in names:
        t = torch.randn(n, c, generator=g) * (0.5 if name == "scale" else 1.0)
        if name in ("scale", "shift"):  # as AdaGN's emb.chunk(2, dim=1): row stride 2C
            t = torch.cat([t, torch.randn(n, c, generator=g)], dim=1)[:, :c]
        kw[name] = t.to(pdt)
    return x, kw, act


def reference_grads(x, groups, kw, act, dy, compute_dtype):
    """(out, grads in GRADS order) by autograd: of the reference computed in compute_dtype (float64,
    float32), or of PyTorch's own composition in x's dtype (F.group_norm and modules) for fp16/bf16."""
    up = (lambda t: t.double()) if compute_dtype == torch.float64 else (lambda t: t)
    leaves = [up(x).detach().requires_grad_()]
    leaves += [None if kw[k] is None else up(kw[k]).detach().requires_grad_()
               for k in ("weight", "bias", "add", "scale", "shift")]
    if compute_dtype in (torch.float16, torch.bfloat16):
        out = torch_group_norm(leaves[0], groups, leaves[1], leaves[2], 1e-5, add=leaves[3], scale=leaves[4],
                               shift=leaves[5], activation=act)
    else:
        out = reference(leaves[0], groups, leaves[1], leaves[2], 1e-5, add=leaves[3], scale=leaves[4],
                        shift=leaves[5], activation=act, compute_dtype=compute_dtype)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, present, up(dy)))
    return out.detach(), [None if t is None else next(grads) for t in leaves]


def path_opts(path):
    """Launcher knobs (vlfast.ops._overrides) of a test path: "single" (the heuristics), "split", "gpp<k>"
    (k groups a program)."""
    if path == "split":
        return SPLIT
    return dict(group_norm_groups_per_program=int(path[3:])) if path.startswith("gpp") else {}


def run_triton(x, groups, kw, act, dy, needs=(True,) * 6, **knobs):
    """Forward and backward with ``knobs`` set (group_norm_groups_per_program acts on the forward only)."""
    with _overrides.use(**knobs):
        out, mean, rstd = group_norm_fwd(x, groups, kw["weight"], kw["bias"], 1e-5, kw["add"], kw["scale"],
                                         kw["shift"], act)
        grads = group_norm_bwd(dy, x, groups, kw["weight"], kw["bias"], kw["add"], kw["scale"], kw["shift"], act,
                               mean, rstd, needs)
    return out, mean, rstd, grads


def check(got, hi, lo, name):
    """fp32: the tolerance table; fp16/bf16: at most twice PyTorch's own error (lo) plus atol.

    2026-12: Triton 3.9's interpreter casts fp32 to bf16 by truncation (its cast_impl passes no rounding
    mode), where a GPU rounds to nearest: on CPU, bf16 results may be off by one more ulp.
    """
    assert got.dtype == lo.dtype and got.shape == hi.shape, name
    if got.dtype == torch.float32:
        assert_close(got, hi, torch.float32, name=name)
    else:
        interpreted = got.device.type == "cpu" and got.dtype == torch.bfloat16
        assert_low_precision_close(got, hi, lo, ulps=1.0 if interpreted else 0.0, name=name)


def check_all(shape, groups, dtype, layout, pattern, affine=True, param_dtype=None, **opts):
    x, kw, act = make_inputs(shape, groups, dtype, layout, pattern, affine, param_dtype)
    dy = torch.empty_like(x).copy_(torch.randn(shape, generator=torch.Generator().manual_seed(1)))
    out, mean, rstd, grads = run_triton(x, groups, kw, act, dy, **opts)
    hi, ghi = reference_grads(x, groups, kw, act, dy, torch.float64)
    lo, glo = reference_grads(x, groups, kw, act, dy, torch.float32 if dtype == torch.float32 else dtype)
    check(out, hi, lo, "out")
    assert out.stride() == x.stride(), "out must keep x's layout"
    for name, got, want_hi, want_lo in zip(GRADS, grads, ghi, glo):
        if want_hi is None:
            assert got is None, name
        else:
            check(got, want_hi, want_lo.to(got.dtype), name)
    assert grads[0].stride() == x.stride(), "dx must keep x's layout"
    # Statistics: those of h = x + add, against torch's own (float32).
    h = x.float() if kw["add"] is None else x.float() + kw["add"].float().reshape(shape[:2] + (1,) * (x.dim() - 2))
    _, tmean, trstd = torch.native_group_norm(h.contiguous(), None, None, shape[0], shape[1],
                                              math.prod(shape[2:]), groups, 1e-5)
    assert_close(mean, tmean, torch.float32, rtol=1e-5, atol=1e-5, name="mean")
    assert_close(rstd, trstd, torch.float32, rtol=1e-4, atol=1e-5, name="rstd")


def case(shape, groups, dtype=torch.float32, layout="nchw", pattern="ddpm", path="single", affine=True):
    sid = "N{}-C{}-G{}-S{}".format(shape[0], shape[1], groups, "x".join(map(str, shape[2:])) or "1")
    pid = f"{sid}-{DT[dtype]}-{layout}-{pattern}{'' if affine else '-noaffine'}-{path}"
    return pytest.param(shape, groups, dtype, layout, pattern, path, affine, id=pid)


CASES = [
    # every pattern, single pass and split, fp32 NCHW
    *[case((2, 8, 5, 7), 4, pattern=p, path=path) for p in PATTERNS for path in ("single", "split")],
    # weight/bias absent
    case((2, 8, 5, 7), 4, pattern="plain", affine=False),
    case((2, 8, 5, 7), 2, pattern="adm", affine=False, path="split"),
    # low precision, both layouts, both paths
    *[case((2, 8, 6, 5), 4, dt, lay, pat, path) for dt in (torch.float16, torch.bfloat16)
      for lay, pat in (("nchw", "ddpm"), ("nhwc", "adm")) for path in ("single", "split")],
    # channels_last, G = 1 and G = C, spatial 1x1, primes, N = 1
    case((2, 8, 5, 7), 4, layout="nhwc", pattern="ddpm"),
    case((2, 8, 5, 7), 4, layout="nhwc", pattern="all-relu", path="split"),
    case((2, 6, 4, 3), 1, pattern="all-relu"),
    case((2, 6, 4, 3), 1, layout="nhwc", pattern="ddpm", path="split"),
    case((2, 6, 4, 3), 6, pattern="adm"),
    case((2, 6, 4, 3), 6, layout="nhwc", pattern="adm", path="split"),
    case((3, 8, 1, 1), 4, pattern="adm"),
    case((3, 8, 1, 1), 2, layout="nhwc", pattern="ddpm", path="split"),
    case((1, 4, 7, 5), 2, pattern="ddpm"),
    case((1, 12, 11, 3), 2, layout="nhwc", pattern="adm", path="split"),  # group spans channel blocks
    case((1, 4, 9, 11), 2, torch.float16, pattern="ddpm", path="split"),  # chunks, a short last one
    # rank 3 (N, C, L) in both layouts, rank 5 channels_last_3d, rank 2
    case((2, 8, 13), 4, pattern="ddpm"),
    case((2, 8, 13), 4, layout="ncl-t", pattern="adm", path="split"),
    case((2, 4, 3, 2, 5), 2, layout="nhwc", pattern="ddpm"),
    case((5, 6), 2, pattern="adm"),  # with 2 channels a group, dx is ill-conditioned (torch errs as much)
]


# The single pass with several groups a program (forced; the backward runs on its mean and rstd):
# channels_last, C/G not a power of two (3 channels: padded tiles), spatial 1x1 and primes.
GPP_CASES = [
    # every pattern, C=24 G=8 (C/G = 3), fp32
    *[case((2, 24, 5, 7), 8, layout="nhwc", pattern=p, path="gpp4") for p in PATTERNS],
    *[case((2, 24, 5, 7), 8, layout="nhwc", pattern="all-relu", path=f"gpp{k}") for k in (0, 1, 2, 8)],
    case((2, 24, 5, 7), 8, layout="nhwc", pattern="plain", path="gpp2", affine=False),
    case((2, 24, 5, 7), 8, layout="nhwc", pattern="adm", path="gpp8", affine=False),
    # C/G a power of two (an unpadded run of channels), C=12 G=4, 1x1, N = 1
    *[case((2, 32, 3, 5), 8, layout="nhwc", pattern="ddpm", path=f"gpp{k}") for k in (2, 8)],
    *[case((2, 12, 7, 3), 4, layout="nhwc", pattern="scale-gelu", path=f"gpp{k}") for k in (2, 4)],
    case((3, 24, 1, 1), 8, layout="nhwc", pattern="adm", path="gpp8"),
    case((3, 16, 1, 1), 4, layout="nhwc", pattern="ddpm", path="gpp2"),
    case((1, 12, 11, 3), 4, layout="nhwc", pattern="shift", path="gpp4"),
    # fp16 / bf16
    *[case((2, 24, 5, 7), 8, dt, "nhwc", pat, f"gpp{k}") for dt in (torch.float16, torch.bfloat16)
      for pat, k in (("ddpm", 2), ("adm", 4), ("add-relu", 8))],
    case((2, 32, 3, 5), 8, torch.bfloat16, "nhwc", "all-relu", "gpp4"),
    case((3, 24, 1, 1), 8, torch.bfloat16, "nhwc", "adm", "gpp2"),
    # rank 3 with unit channel stride, rank 5 channels_last_3d, rank 2; NCHW (correct, not fast)
    case((2, 12, 13), 4, layout="ncl-t", pattern="adm", path="gpp2"),
    case((2, 12, 3, 2, 5), 4, layout="nhwc", pattern="ddpm", path="gpp4"),
    case((5, 12), 4, pattern="adm", path="gpp4"),
    case((2, 24, 5, 7), 8, pattern="all-relu", path="gpp2"),
]


@pytest.mark.parametrize("shape,groups,dtype,layout,pattern,path,affine", CASES + GPP_CASES)
def test_forward_backward(shape, groups, dtype, layout, pattern, path, affine):
    check_all(shape, groups, dtype, layout, pattern, affine, **path_opts(path))


def test_mixed_dtypes():
    """bf16 input with float32 parameters: grads come back in each input's dtype."""
    check_all((2, 8, 5, 3), 4, torch.bfloat16, "nchw", "all-relu", param_dtype=torch.float32)


def test_split_path_with_default_tiles():
    """A group too large for the single pass, with the default split tiles."""
    check_all((1, 4, 40, 40), 1, torch.float32, "nhwc", "adm", group_norm_single_max=4096)


def test_path_choice():
    """The single pass for groups that fit with enough programs; the split for big groups or few programs."""
    cpu = torch.device("cpu")
    assert gnt._use_single(64, 32, 4, 32 * 32, torch.float32, False, None, cpu)
    assert gnt._use_single(16, 32, 8, 64 * 64, torch.bfloat16, False, None, cpu)
    assert not gnt._use_single(16, 32, 8, 64 * 64, torch.float32, False, None, cpu)
    assert not gnt._use_single(4, 32, 4, 256 * 256, torch.bfloat16, False, None, cpu)
    assert not gnt._use_single(8, 32, 16, 32 * 32, torch.bfloat16, False, None, cpu)  # 256 programs
    assert gnt._use_single(2, 32, 4, 8 * 8, torch.float32, False, None, cpu)  # small: launch-bound
    cfg = gnt._split_config(4, 128, 4, 256 * 256, 1, None, None, cpu)
    assert cfg["P"] <= gnt.MAX_CHUNKS and cfg["S_CHUNK"] % cfg["BLOCK_S"] == 0


def test_groups_per_program_choice(monkeypatch):
    """Channels_last widens a single-pass program to several groups; NCHW keeps one."""
    cpu = torch.device("cpu")
    pick = gnt.default_groups_per_program
    assert pick(2, 64, 32, 5 * 7, torch.float32, 1, cpu) == 16  # 2 channels x 4 bytes x 16 = 128 bytes
    assert pick(2, 64, 32, 5 * 7, torch.float32, 5 * 7, cpu) == 0  # NCHW: the one-group kernel
    assert pick(2, 256, 32, 8 * 8, torch.bfloat16, 1, cpu) == 8  # 8 channels x 2 bytes x 8 = 128 bytes
    assert pick(2, 96, 32, 8 * 8, torch.bfloat16, 1, cpu) == 32  # C/G = 3: 16 groups are 96 bytes, 32 are 192
    assert pick(64, 128, 32, 32 * 32, torch.bfloat16, 1, cpu) == 4  # 8 would leave 256 < 2 * 132 programs
    assert pick(16, 256, 32, 64 * 64, torch.bfloat16, 1, cpu) == 1  # one group fills the register budget
    # The launcher runs what the rule picks.
    from vlfast.kernels import group_norm as kernels
    real, launched = kernels.group_norm_fwd_fused_groups_kernel, []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                launched.append((grid, kw["GPP"]))
                return real[grid](*args, **kw)
            return launch
    monkeypatch.setattr(kernels, "group_norm_fwd_fused_groups_kernel", Spy())
    check_all((2, 64, 5, 7), 32, torch.float32, "nhwc", "ddpm")
    assert launched == [((4,), 16)]


@pytest.mark.parametrize("path", ["single", "split"])
def test_deterministic(path):
    opts = SPLIT if path == "split" else {}
    x, kw, act = make_inputs((2, 8, 6, 5), 4, torch.float32, "nhwc", "all-relu")
    dy = torch.randn(x.shape)
    first = run_triton(x, 4, kw, act, dy, **opts)
    second = run_triton(x, 4, kw, act, dy, **opts)
    for a, b in zip(first[:3] + tuple(first[3]), second[:3] + tuple(second[3])):
        assert torch.equal(a, b)


@pytest.mark.parametrize("path", ["single", "split", "gpp4"])
def test_nan_propagates_to_its_group(path):
    layout = "nhwc" if path == "gpp4" else "nchw"  # gpp4: one program holds all four groups
    x, kw, act = make_inputs((2, 8, 5, 7), 4, torch.float32, layout, "ddpm")
    x[1, 3, 2, 4] = float("nan")  # sample 1, group 1 (channels 2, 3)
    with _overrides.use(**path_opts(path)):
        out, mean, rstd = group_norm_fwd(x, 4, kw["weight"], kw["bias"], 1e-5, kw["add"], None, None, "relu")
    assert out[1, 2:4].isnan().all() and mean[1, 1].isnan() and rstd[1, 1].isnan()
    out[1, 2:4] = 0.0
    mean[1, 1] = rstd[1, 1] = 0.0
    assert not out.isnan().any() and not mean.isnan().any() and not rstd.isnan().any()


def test_batch_zero():
    x, kw, act = make_inputs((0, 8, 3, 3), 4, torch.float32, "nchw", "adm")
    dy = torch.randn(x.shape)
    out, mean, rstd, (dx, dw, db, dadd, dscale, dshift) = run_triton(x, 4, kw, act, dy)
    assert out.shape == x.shape and mean.shape == (0, 4) and rstd.shape == (0, 4)
    assert dx.shape == x.shape and dscale.shape == (0, 8) and dshift.shape == (0, 8) and dadd is None
    assert torch.equal(dw, torch.zeros(8)) and torch.equal(db, torch.zeros(8))


def test_grad_layout_and_needs():
    """dy in another layout is matched to x's; only the requested grads come back."""
    x, kw, act = make_inputs((2, 8, 5, 3), 2, torch.float32, "nhwc", "all-relu")
    dy = torch.randn(x.shape)  # NCHW while x is channels_last
    out, mean, rstd = group_norm_fwd(x, 2, kw["weight"], kw["bias"], 1e-5, kw["add"], kw["scale"], kw["shift"], act)
    _, want = reference_grads(x, 2, kw, act, dy, torch.float64)
    for needs in [(True, False, False, False, False, False), (False, True, False, True, False, True)]:
        for opts in ({}, SPLIT):
            with _overrides.use(**opts):
                got = group_norm_bwd(dy, x, 2, kw["weight"], kw["bias"], kw["add"], kw["scale"], kw["shift"], act,
                                     mean, rstd, needs)
            for name, need, g, w in zip(GRADS, needs, got, want):
                if not need:
                    assert g is None, name
                else:
                    assert_close(g, w, torch.float32, name=name)
            if needs[0]:
                assert got[0].is_contiguous(memory_format=torch.channels_last)


def test_bad_arguments():
    x = torch.randn(2, 6, 3, 3)
    with pytest.raises(ValueError, match="divide"):
        group_norm_fwd(x, 4)
    with pytest.raises(ValueError, match="add"):
        group_norm_fwd(x, 3, add=torch.randn(2, 5))
    with pytest.raises(ValueError, match="activation"):
        group_norm_fwd(x, 3, activation="tanh")
    with pytest.raises(TypeError):
        group_norm_fwd(x.double(), 3)
    for gpp in (-1, 2, 3):  # G = 3: 2 does not divide it, -1 and 3 are not powers of two
        with _overrides.use(group_norm_groups_per_program=gpp):
            with pytest.raises(ValueError, match="groups_per_program"):
                group_norm_fwd(x, 3)
    with pytest.raises(TypeError):  # tuning knobs are overrides, not launcher arguments
        group_norm_fwd(x, 3, single_max=0)


def test_split_path_prediction_matches_the_launcher():
    from vlfast.ops.group_norm_triton import takes_split_path
    # 8x512x32x32: 256 (sample, group) programs for 132 SMs, groups of 16K elements: split.
    assert takes_split_path(torch.empty(8, 512, 32, 32, dtype=torch.bfloat16), 32)
    # 64x128x32x32: 2048 programs, groups of 4K elements: one pass.
    assert not takes_split_path(torch.empty(64, 128, 32, 32, dtype=torch.bfloat16), 32)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_split_statistics_with_a_large_mean_and_an_outlier_first(layout):
    """The split path's shifted sums (shift: each chunk's first element) against float64, where a plain
    E[x^2] - E[x]^2 in float32 would lose the variance: mean 1000, std 1, and an outlier as the shift."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 8, 16, 16, generator=g) + 1000.0
    x[:, :, 0, 0] += 25.0  # the first element of every channel: the shift of its first chunk
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    with _overrides.use(**SPLIT):
        out, mean, rstd = group_norm_fwd(x, 4, eps=1e-5)
    xd = x.double().reshape(2, 4, -1)
    assert_close(mean, xd.mean(-1).float(), torch.float32, rtol=1e-6, atol=1e-4)
    assert_close(rstd, (xd.var(-1, unbiased=False) + 1e-5).rsqrt().float(), torch.float32, rtol=1e-4, atol=1e-5)
    assert_close(out, reference(x.double(), 4), torch.float32, rtol=1e-4, atol=1e-4)
