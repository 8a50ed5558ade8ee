"""Tolerances, comparison helpers and input factories shared by the tests and the benchmarks."""

import torch

# (rtol, atol) of a kernel against a float64 reference, per dtype.
TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 2e-5),
       torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2)}


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so that any element a kernel forgets to write fails the comparison."""
    return t.fill_(float("nan"))


def assert_close(actual, expected, dtype=None, *, rtol=None, atol=None, name="output"):
    """Compare with the per-dtype tolerance; NaN never passes unless both are NaN at the same place."""
    dtype = dtype or actual.dtype
    r, a = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol if rtol is not None else r,
                               atol=atol if atol is not None else a, equal_nan=True, msg=lambda m: f"{name}: {m}")


# The atol of the low-precision rule: the output of a kernel that computes in fp32 and rounds once is
# within its dtype's rounding of the float64 value, which PyTorch's own result (rounded too) is at least;
# atol covers the last bits of fp32 arithmetic near 0.
LOW_PRECISION_ATOL = 1e-5


def ulp(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype``'s numbers at |t| (float64), its subnormal spacing near 0."""
    info = torch.finfo(dtype)
    exponent = torch.floor(torch.log2(t.double().abs().clamp_min(info.smallest_normal)))
    return torch.exp2(exponent) * info.eps


def assert_low_precision_close(actual, expected64, torch_lowp, *, atol=LOW_PRECISION_ATOL, ulps=0.0, name="output"):
    """The low-precision rule: the error against float64 at most twice PyTorch's own error in that dtype,
    element by element, plus atol (and ``ulps`` units in the last place of actual's dtype, for a known
    rounding defect a caller names).

    ``torch_lowp`` is the computation as PyTorch itself does it in the low-precision dtype (for GroupNorm:
    :func:`torch_group_norm`), not a reference run wholly in that dtype, whose error is several times
    PyTorch's own.
    """
    exp = expected64.double()
    err = (actual.double() - exp).abs()
    allowed = 2 * (torch_lowp.double() - exp).abs() + atol
    if ulps:
        allowed = allowed + ulps * ulp(exp, actual.dtype)
    assert not torch.isnan(actual).any() or torch.isnan(exp).any(), f"{name}: NaN where the reference has none"
    bad = err > allowed
    if bad.any():
        i = int(torch.argmax((err - allowed).reshape(-1)))
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), err.shape))
        raise AssertionError(f"{name}: {int(bad.sum())} of {err.numel()} elements off; worst at {idx}: "
                             f"got {actual[idx].item()}, float64 {exp[idx].item()}, PyTorch in "
                             f"{actual.dtype} {torch_lowp[idx].item()}, allowed error {allowed[idx].item():.3g}")


def torch_group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, add=None, scale=None, shift=None,
                     activation=None):
    """vlfast's fused GroupNorm as PyTorch modules compute it in x's dtype: every operand in x's dtype,
    ``x + add``, F.group_norm (aten's), ``* (1 + scale) + shift`` and the activation each rounding to it. The
    baseline of :func:`assert_low_precision_close` for GroupNorm (differentiable: the gradients' baseline
    too)."""
    from vlfast.activations import activate

    def cast(t):
        return None if t is None else t.to(x.dtype)

    def per_channel(t):
        return t.to(x.dtype).reshape(t.shape + (1,) * (x.dim() - 2))

    h = x if add is None else x + per_channel(add)
    # aten's group_norm, which F.group_norm calls after refusing groups of one element (G = C at 1x1)
    y = torch.group_norm(h, num_groups, cast(weight), cast(bias), eps, torch.backends.cudnn.enabled)
    if scale is not None:
        y = y * (1 + per_channel(scale))
    if shift is not None:
        y = y + per_channel(shift)
    return activate(y, activation)


# ---------------------------------------------------------------- input factories
def ddpm_coef(rows: int = 12, seed: int = 0) -> torch.Tensor:
    """A (rows, N_COEF) float32 table of random DDPM/DDIM step coefficients (vlfast.reference.ddpm's
    layout) with valid noise scales and log-variance bounds."""
    from vlfast.reference import ddpm as ref
    g = torch.Generator().manual_seed(seed)
    coef = torch.rand(rows, ref.N_COEF, generator=g) * 2 - 1
    coef[:, ref.SIGMA] = coef[:, ref.SIGMA].abs() + 0.1
    coef[:, ref.LOG_MIN] = -3.0
    coef[:, ref.LOG_MAX] = -1.0
    return coef
