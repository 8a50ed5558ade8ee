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


def assert_low_precision_close(actual, expected64, torch_lowp, *, atol=1e-3, name="output"):
    """The low-precision rule: error against float64 at most twice PyTorch's own error in that dtype, plus atol.

    ``torch_lowp`` is the same computation done by plain PyTorch in the low-precision dtype.
    """
    exp = expected64.double()
    err = (actual.double() - exp).abs()
    allowed = 2 * (torch_lowp.double() - exp).abs() + atol + TOL[actual.dtype][0] * exp.abs()
    assert not torch.isnan(actual).any() or torch.isnan(exp).any(), f"{name}: NaN where the reference has none"
    bad = err > allowed
    if bad.any():
        i = int(torch.argmax((err - allowed).reshape(-1)))
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), err.shape))
        raise AssertionError(f"{name}: {int(bad.sum())} of {err.numel()} elements off; worst at {idx}: "
                             f"got {actual[idx].item()}, float64 {exp[idx].item()}, allowed {allowed[idx].item()}")


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
