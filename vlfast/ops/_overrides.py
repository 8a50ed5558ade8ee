"""Private tuning knobs: force a kernel path or a tile rule for tests, benchmark probes and tools.

Not part of the public API; launchers read a knob with :func:`get` where their heuristic decides, so
their public signatures carry no test-only arguments. The knobs set are part of the key of the ops'
per-geometry plan cache (:func:`snapshot`: a plan made under a knob never serves a call made without it).
The knobs of :data:`PLAN_KNOBS` are read while a plan is made, so a per-card tuning table may carry them
for the backend that won with them (``vlfast.tuning``)::

    from vlfast.ops import _overrides
    with _overrides.use(conv_transpose_kernel="phase"):
        y = vlfast.ops.conv_transpose2d(x, w, stride=2, backend="triton")

Knobs (None or absent: the heuristic decides):

- ``conv_transpose_kernel``: "subpixel" (dilation 1 only) or "phase";
- ``group_norm_single_max``: padded group elements up to which the single-pass kernels run (0: split);
- ``group_norm_split_tile``, ``group_norm_split_programs``: tiles of the split kernels;
- ``group_norm_groups_per_program``: 0 the one-group forward kernel, k >= 1 the channel-run kernel;
- ``igemm_tiles``: a dict of some of BLOCK_M, BLOCK_N, BLOCK_K (powers of two, 16 to 256), GROUP_M, num_warps
  (a power of two up to 16) and num_stages (up to 8) for the convolutions' forward implicit-GEMM kernels, in
  place of the tile rule's (BLOCK_K no longer than the power of two at or above Cin/G);
- ``group_norm_cuda_path``: "onepass", "split" or "auto" for the CUDA forward. The CUDA glue keeps this
  one in the extension (``torch.ops.vlfast.group_norm_set_cuda_path``), which :func:`use` sets on
  entering and restores on leaving: unlike the others it is process-wide, not per thread or context;
- ``group_norm_cpu_cache``: bytes of x a task of the CPU forward may hold in the cache (0: never; absent:
  half the per-core L2): where a task's slab fits, x streams from memory once. Kept in the extension
  (``torch.ops.vlfast.group_norm_set_cpu_cache``) and process-wide, like ``group_norm_cuda_path``;
- ``group_norm_cpu_stream``: True / False: whether the CPU forward writes NCHW float32 output by streaming
  (non-temporal) stores, past the caches (absent: for fresh outputs of 8 MiB or more; never channels-last). Kept in the
  extension (``torch.ops.vlfast.group_norm_set_cpu_stream``) and process-wide, like ``group_norm_cpu_cache``;
- ``fold_batchnorm``: True / False: whether ``vlfast.blocks.Sequential`` folds eval-mode BatchNorm into the
  convolution before it (absent: on CUDA tensors only; see :mod:`vlfast.blocks.sequential`).
"""

import contextlib
import contextvars
from typing import Any

import torch

KNOBS = ("conv_transpose_kernel", "group_norm_single_max", "group_norm_split_tile", "group_norm_split_programs",
         "group_norm_groups_per_program", "group_norm_cuda_path", "group_norm_cpu_cache",
         "group_norm_cpu_stream", "fold_batchnorm", "igemm_tiles")
# Read while a plan is made (not while it runs): a tuning table may carry them (vlfast.tuning).
PLAN_KNOBS = ("conv_transpose_kernel", "group_norm_single_max", "group_norm_split_tile", "group_norm_split_programs",
              "group_norm_groups_per_program", "igemm_tiles")
TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")

_current: contextvars.ContextVar = contextvars.ContextVar("vlfast_overrides", default=None)
# group_norm_cuda_path -> the code of the extension's setter (csrc/ops.cpp).
CUDA_PATHS = {"auto": 0, "onepass": 1, "split": 2}


@contextlib.contextmanager
def use(**knobs: Any):
    """Set knobs inside the block (nested blocks add to the outer ones; None unsets one)."""
    unknown = set(knobs) - set(KNOBS)
    if unknown:
        raise ValueError(f"unknown override(s) {sorted(unknown)}; known: {KNOBS}")
    path = knobs.get("group_norm_cuda_path")
    if path is not None and path not in CUDA_PATHS:
        raise ValueError(f"group_norm_cuda_path must be one of {tuple(CUDA_PATHS)}, got {path!r}")
    cache = knobs.get("group_norm_cpu_cache")
    if cache is not None and (isinstance(cache, bool) or not isinstance(cache, int) or cache < 0):
        raise ValueError(f"group_norm_cpu_cache must be a non-negative int (bytes), got {cache!r}")
    tiles = knobs.get("igemm_tiles")
    if tiles is not None:
        check_tiles(tiles)
    stream = knobs.get("group_norm_cpu_stream")
    if stream is not None and not isinstance(stream, bool):
        raise ValueError(f"group_norm_cpu_stream must be True, False or None, got {stream!r}")
    outer = _current.get() or {}
    merged = {**outer, **knobs}
    merged = {k: v for k, v in merged.items() if v is not None}
    # The knobs kept in the extension: set only where this block changes them.
    changed = [k for k in _EXTENSION_KNOBS if merged.get(k) != outer.get(k)]
    for k in changed:
        _EXTENSION_KNOBS[k](merged.get(k))
    token = _current.set(merged or None)
    try:
        yield
    finally:
        _current.reset(token)
        for k in changed:
            _EXTENSION_KNOBS[k](outer.get(k))


def check_tiles(tiles) -> None:
    """Refuse an ``igemm_tiles`` knob the kernels cannot take."""
    if not isinstance(tiles, dict) or set(tiles) - set(TILE_KEYS):
        raise ValueError(f"igemm_tiles must be a dict of some of {TILE_KEYS}, got {tiles!r}")
    for k, v in tiles.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"igemm_tiles[{k!r}] must be a positive int, got {v!r}")
        if (k.startswith("BLOCK_") or k == "num_warps") and v & (v - 1):
            raise ValueError(f"igemm_tiles[{k!r}] must be a power of two, got {v!r}")
        if k.startswith("BLOCK_") and not 16 <= v <= 256:
            raise ValueError(f"igemm_tiles[{k!r}] must be 16 to 256, got {v}")
        if k == "num_warps" and v > 16 or k == "num_stages" and v > 8:
            raise ValueError(f"igemm_tiles[{k!r}] = {v} is beyond what the kernels take")


def snapshot():
    """The knobs set now, hashable (None where none is): part of the ops' plan-cache key."""
    knobs = _current.get()
    if knobs is None:
        return None
    return tuple(sorted((k, tuple(sorted(v.items())) if isinstance(v, dict) else v) for k, v in knobs.items()))


def plan_knobs() -> dict:
    """The knobs of :data:`PLAN_KNOBS` set now."""
    knobs = _current.get() or {}
    return {k: v for k, v in knobs.items() if k in PLAN_KNOBS}


# Constant while torch.compile traces (a ContextVar cannot be traced): a knob is read once, at trace time.
@torch.compiler.assume_constant_result
def get(name: str, default: Any = None) -> Any:
    """The knob's value, or ``default`` where it is not set."""
    knobs = _current.get()
    return default if knobs is None else knobs.get(name, default)


def active() -> bool:
    """Whether any knob is set (the ops then plan every call afresh)."""
    return _current.get() is not None


def _extension_setter(name: str):
    """The extension's setter ``name``, or None without vlfast._C (no kernels to steer)."""
    try:
        from vlfast import _C  # noqa: F401 - loads the ops
    except ImportError:
        return None
    setter = getattr(torch.ops.vlfast, name, None)
    if setter is None:
        raise RuntimeError(f"vlfast._C has no {name}: it predates the knob, rebuild it "
                           "(pip install --no-build-isolation -e .)")
    return setter


def _set_cuda_path(path) -> None:
    """Tell the extension's CUDA GroupNorm forward which path to take (None: auto); a no-op without vlfast._C."""
    setter = _extension_setter("group_norm_set_cuda_path")
    if setter is not None:
        setter(CUDA_PATHS[path or "auto"])


def _set_cpu_cache(nbytes) -> None:
    """Tell the extension's CPU GroupNorm forward its cache budget (None: automatic); a no-op without vlfast._C."""
    setter = _extension_setter("group_norm_set_cpu_cache")
    if setter is not None:
        setter(-1 if nbytes is None else nbytes)


def _set_cpu_stream(stream) -> None:
    """Tell the extension's CPU GroupNorm forward how to store (None: automatic); a no-op without vlfast._C."""
    setter = _extension_setter("group_norm_set_cpu_stream")
    if setter is not None:
        setter(-1 if stream is None else int(stream))


# The knobs the extension keeps, and their setters.
_EXTENSION_KNOBS = {"group_norm_cuda_path": _set_cuda_path, "group_norm_cpu_cache": _set_cpu_cache,
                    "group_norm_cpu_stream": _set_cpu_stream}
