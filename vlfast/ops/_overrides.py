"""Private tuning knobs: force a kernel path or a tile rule for tests, benchmark probes and tools.

Not part of the public API; launchers read a knob with :func:`get` where their heuristic decides, so
their public signatures carry no test-only arguments. While any knob is set the ops skip their
per-geometry plan cache (a plan made under a knob must not serve a call made without it)::

    from vlfast.ops import _overrides
    with _overrides.use(conv_transpose_kernel="phase"):
        y = vlfast.ops.conv_transpose2d(x, w, stride=2, backend="triton")

Knobs (None or absent: the heuristic decides):

- ``conv_transpose_kernel``: "subpixel" (dilation 1 only) or "phase";
- ``group_norm_single_max``: padded group elements up to which the single-pass kernels run (0: split);
- ``group_norm_split_tile``, ``group_norm_split_programs``: tiles of the split kernels;
- ``group_norm_groups_per_program``: 0 the one-group forward kernel, k >= 1 the channel-run kernel;
- ``group_norm_cuda_path``: "onepass" or "split" for the CUDA forward.
"""

import contextlib
import contextvars
from typing import Any

KNOBS = ("conv_transpose_kernel", "group_norm_single_max", "group_norm_split_tile", "group_norm_split_programs",
         "group_norm_groups_per_program", "group_norm_cuda_path")

_current: contextvars.ContextVar = contextvars.ContextVar("vlfast_overrides", default=None)


@contextlib.contextmanager
def use(**knobs: Any):
    """Set knobs inside the block (nested blocks add to the outer ones; None unsets one)."""
    unknown = set(knobs) - set(KNOBS)
    if unknown:
        raise ValueError(f"unknown override(s) {sorted(unknown)}; known: {KNOBS}")
    merged = {**(_current.get() or {}), **knobs}
    merged = {k: v for k, v in merged.items() if v is not None}
    token = _current.set(merged or None)
    try:
        yield
    finally:
        _current.reset(token)


def get(name: str, default: Any = None) -> Any:
    """The knob's value, or ``default`` where it is not set."""
    knobs = _current.get()
    return default if knobs is None else knobs.get(name, default)


def active() -> bool:
    """Whether any knob is set (the ops then plan every call afresh)."""
    return _current.get() is not None
